"""Every use of DeepSpeed's private ZeRO-3 internals lives here, so a DeepSpeed upgrade touches one file.

Checked against DeepSpeed 0.19.8 (see shared DESIGN notes):
- a ZeRO-3 parameter carries its own 1-D shard in ``p.ds_tensor`` (``ceil(numel / world)`` elements,
  padded at the tail), its full size in ``p.ds_numel`` and its partition group in ``p.ds_process_group``;
- an engine built without an optimizer holds a ``DeepSpeedZeRoOffload`` in ``engine.optimizer`` whose
  parameter coordinator gathers and releases parameters around each module;
- since 0.18.3 the engine's output hooks refuse a plain ``loss.backward()`` unless it runs inside
  ``engine.backward``, which itself needs a ZeRO optimizer;
- for the benchmark's read-only byte counts (end of file): ``p.ds_persist`` marks the small parameters that stay
  gathered; DeepSpeed's own ZeRO-3 optimizer holds ``fp32_partitioned_groups_flat`` (the master copy, the
  weight buffer itself in fp32 training; its ``.grad`` is the fp32 gradient buffer),
  ``grad_partitions_flat_buffer`` and ``ipg_buckets`` (the reduce bucket), and the torch optimizer's ``state``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed reduce_scatter_tensor (the old name warns); the GPU images run older torch.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def is_engine(obj) -> bool:
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # deepspeed is a dependency, but the plain-module path must not need it
        return False
    return isinstance(obj, DeepSpeedEngine)


def partition_group(p: torch.Tensor):
    return p.ds_process_group


def reduce_to_shard(p: torch.Tensor, grad: torch.Tensor, async_op: bool = False):
    """Start summing ``grad`` (full size, local to this rank) over ``p``'s partition group.

    Returns ``(work, finish)``: ``work`` is the collective's handle (None when nothing was launched) and,
    once it is waited on, ``finish()`` gives ``(grad_shard, weight_shard)``: the slices of the summed
    gradient and of ``p.ds_tensor`` that this rank owns, without padding. Either may be empty when padding
    covers this rank's whole shard."""
    shard = p.ds_tensor
    world = group_world_size(p)
    start, valid = _shard_span(p)
    flat = grad.reshape(-1)
    work = None
    if world == 1:
        out = flat
    else:
        n = shard.numel()
        pad = n * world - flat.numel()
        if pad:
            flat = F.pad(flat, (0, pad))
        out = torch.empty(n, dtype=flat.dtype, device=flat.device)
        work = _reduce_scatter(out, flat, group=p.ds_process_group, async_op=async_op)

    def finish(keep=flat):  # ``keep``: the input stays alive until the collective is done
        g = out[:valid]
        if g.device != shard.device:
            # Parameters offloaded to CPU: a blocking copy, since the update reads the gradient on the host
            # at once (a non_blocking device-to-host copy could still be in flight).
            g = g.to(shard.device)
        return g, shard[:valid]

    return work, finish


def _shard_span(p: torch.Tensor) -> tuple[int, int]:
    """(offset in the flattened parameter, number of real elements) of this rank's shard. The shard index is
    the rank inside the partition group: not LOCAL_RANK (wrong on several nodes), not always the global rank.
    Tiny tensors can be all padding on several ranks: clamp instead of a negative-length narrow."""
    n = p.ds_tensor.numel()
    start = (dist.get_rank(p.ds_process_group) if dist.is_initialized() else 0) * n
    return start, max(0, min(n, p.ds_numel - start))


def local_weight(p: torch.Tensor) -> torch.Tensor:
    """The weights this rank updates, matching ``reduce_to_shard``'s gradient: its shard without padding (flat),
    or the whole tensor."""
    if not is_zero3_param(p):
        return p.data
    return p.ds_tensor[:_shard_span(p)[1]]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape (a partitioned one's local tensor is empty)."""
    return tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape)


def shard_offset(p: torch.Tensor) -> int:
    """Where this rank's shard starts in the flattened parameter (0 for a parameter held whole)."""
    return _shard_span(p)[0] if is_zero3_param(p) else 0


def group_world_size(p: torch.Tensor) -> int:
    return dist.get_world_size(p.ds_process_group) if dist.is_initialized() else 1


def offload_of(engine):
    """The engine's ``DeepSpeedZeRoOffload``, or raise if the engine was given a ZeRO optimizer."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeRoOffload):
        raise ValueError(
            "LOMO needs a ZeRO-3 engine created without an optimizer "
            f"(deepspeed.initialize(model=..., config=...) with no 'optimizer' block); got {type(opt).__name__}. "
            "Remove the optimizer from deepspeed.initialize and the 'optimizer' block from the DeepSpeed config.")
    return opt


def check_engine(engine) -> None:
    if engine.zero_optimization_stage() != 3:
        raise ValueError(f"LOMO's partitioned update needs zero_optimization.stage = 3, got "
                         f"{engine.zero_optimization_stage()}; set it to 3 or pass the plain module instead.")
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError("DeepSpeed never sees LOMO's gradients, so its gradient_accumulation_steps must be 1 "
                         f"(got {engine.gradient_accumulation_steps()}); accumulate with LOMO(..., accumulate=True).")
    offload_of(engine)
    if engine.zero_offload_param() is not None and str(engine.zero_offload_param().device).endswith("nvme"):
        raise ValueError("zero_optimization.offload_param.device = 'nvme' is not supported by LOMO; use 'cpu' or 'none'.")


@contextlib.contextmanager
def backward_allowed(engine):
    """Let ``loss.backward()`` through when the loss came from ``engine(...)``.

    The engine's output hooks call ``engine._backward_prologue``, which raises for a direct backward and
    would call ZeRO-optimizer methods the parameter-offload object does not have. LOMO needs none of
    that bookkeeping (no gradient accumulation, no ZeRO gradient buffers), so it is skipped for the
    duration of LOMO's own backward. A loss from the bare module never reaches these hooks."""
    if engine is None:
        yield
        return
    engine._backward_prologue = lambda: None  # instance attribute shadows the method
    try:
        yield
    finally:
        del engine._backward_prologue


def after_backward(engine) -> None:
    """Release what backward left gathered: modules whose input needs no gradient (the embedding)
    never get their post-backward release, and the next gather would fail on them."""
    if engine is not None:
        offload_of(engine).release_backward_leftovers()


def refresh_partitions(engine) -> None:
    """Make the next forward see the updated shards. Call it after the last shard write of a step.

    - DeepSpeed all-gathers ``ds_tensor`` on its own stream, which nothing orders after LOMO's writes on the
      compute stream: that stream waits for the current one here (on CPU there are no streams: a no-op).
    - Parameters under ``stage3_param_persistence_threshold`` (every norm weight of a LLaMA), and the first
      module once the trace is complete, stay gathered between steps with pre-update values: re-partition
      everything. The persistent ones are not re-gathered here (DeepSpeed's synchronous ``all_gather``
      synchronises the whole device): the next forward gathers them asynchronously, as it gathers any
      partitioned parameter, and they stay gathered from then on.
    - ZeRO++ hpZ keeps a secondary copy of each shard that gathers prefer, rebuilt from the gathered (here:
      pre-update) values whenever a parameter is released; like DeepSpeed's own optimizer after its step,
      drop them all once everything is released, so the next gather reads the updated primary shards.
    No host or device synchronisation."""
    if engine is None:
        return
    offload = offload_of(engine)
    stream = _allgather_stream(offload)
    if stream is not None:
        from deepspeed.accelerator import get_accelerator

        stream.wait_stream(get_accelerator().current_stream())
    offload.partition_all_parameters()
    for p in engine.module.parameters():  # after re-partitioning: releasing a gathered copy rebuilds its secondary
        if getattr(p, "ds_secondary_tensor", None) is not None:
            p.ds_secondary_tensor = None


def _allgather_stream(offload):
    """The stream the parameter coordinator gathers on (None on CPU, where DeepSpeed makes none)."""
    return getattr(offload.get_param_coordinator(), "_PartitionedParameterCoordinator__allgather_stream", None)


def consolidated_state_dict(engine) -> dict:
    """The full weights, gathered module by module onto rank 0's CPU (other ranks get an empty dict).
    Collective: every rank must call it."""
    return engine._zero3_consolidated_16bit_state_dict()  # despite the name, keeps each parameter's dtype


def gathered(params):
    """Context: ``params`` whole on every rank (a collective under ZeRO-3; nothing for plain tensors)."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


@torch.no_grad()
def load_full_param_(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's slice of the full tensor ``full`` into ``p``'s shard (no communication).
    Call ``refresh_partitions`` afterwards so gathered copies are dropped."""
    start, valid = _shard_span(p)
    if valid:
        p.ds_tensor[:valid].copy_(full.reshape(-1)[start:start + valid])


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (a partitioned one's local tensor is empty)."""
    return p.ds_numel if is_zero3_param(p) else p.numel()


def local_data(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 shard (padding included), or the whole tensor."""
    return p.ds_tensor if is_zero3_param(p) else p.data


def disable_cpu_shm_build() -> None:
    """On CPU, DeepSpeed's comm backend compiles a shared-memory all-reduce op with g++ (60-90 s on two
    cores) that only inference uses. LOMO never calls it: skip the build."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # by module path: ``deepspeed.comm.torch`` as an attribute is the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ---------------------------------------------------------------- read-only probes (benchmark)
def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _unique(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _bytes(t)
    return total


def gathered_numel(module: torch.nn.Module) -> int:
    """Elements of ``module``'s parameters that are gathered or being gathered (a prefetch in flight)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in module.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def parameter_bytes(module: torch.nn.Module) -> dict:
    """This rank's shards, the persistent parameters held whole, and the largest full parameter."""
    shards = persistent = largest = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            shards += _bytes(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                persistent += p.ds_numel * p.element_size()
            largest = max(largest, p.ds_numel * p.element_size())
        else:
            shards += _bytes(p)
            largest = max(largest, _bytes(p))
    return {"param_shards": shards, "persistent_params": persistent, "largest_param": largest}


def optimizer_bytes(engine) -> dict:
    """Master copy, optimizer states and gradient buffers of DeepSpeed's ZeRO-3 optimizer (zeros for an
    engine built without one). ``reduce_bucket`` is the bucket's allocated size."""
    opt = engine.optimizer
    out = {"master": 0, "states": 0, "grad_partitions": 0, "fp32_grads": 0, "reduce_bucket": 0}
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return out
    weights = {t.data_ptr() for t in getattr(opt, "fp16_partitioned_groups_flat", []) if isinstance(t, torch.Tensor)}
    seen = set(weights)  # an fp32 run's master copy is the weight buffer: not counted twice
    out["master"] = _unique(opt.fp32_partitioned_groups_flat, seen)
    states = [v for s in opt.optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    out["states"] = _unique(states, seen)
    out["grad_partitions"] = _unique([getattr(opt, "grad_partitions_flat_buffer", None)], seen)
    out["fp32_grads"] = _unique([t.grad for t in opt.fp32_partitioned_groups_flat], seen)
    out["reduce_bucket"] = _unique([getattr(b, "buffer", None) for b in getattr(opt, "ipg_buckets", {}).values()], seen)
    return out
