"""Per-GPU peak memory of LOMO, SGD and AdamW under DeepSpeed ZeRO-3, term by term.

    python -m lomo_trainer.planner --model 65b --gpus 8 --gpu-mem-gb 24 --seq-len 512 --batch 1 \
        --activation-checkpointing

The model is its parameter inventory (``inventory.py``: the config instantiated on the meta device, any HF
causal LM, dense or mixture-of-experts); the activation and logit terms are ``activations.py``'s. The arithmetic
follows what DeepSpeed 0.19.8 and transformers 5.x allocate (read from their code, checked against the benchmark's
measurements; see docs/benchmarks.md):

- parameter shards: every parameter's ``ds_tensor`` holds ``ceil(numel / gpus)`` elements (0 on the GPU with
  ``offload_param``); parameters of at most ``stage3_param_persistence_threshold`` elements also stay gathered,
  whole.
- gathered working set: ZeRO-3 gathers module by module, but once its trace is complete (from the second
  step on) it does not release what it will need again soon, so training reaches backward with a whole tail
  of the model gathered (measured on DeepSpeed 0.19.8 by counting gathered parameters; docs/benchmarks.md):
  the prefetcher runs ahead into backward's part of the trace and keeps what it fetched there, up to
  ``stage3_max_live_parameters`` elements; and a parameter whose next use lies within
  ``stage3_max_reuse_distance`` elements of trace stays gathered. Both tails start at the LM head (backward's
  first module), so the larger one counts. With DeepSpeed's defaults (1e9 each) a model under ~1B parameters
  stays gathered whole, and a bigger one keeps 1e9 elements gathered (1.9 GiB in 16 bits) on every GPU.
  Forward only: the prefetcher still runs ``stage3_max_live_parameters`` ahead. On one GPU nothing is copied:
  a gathered parameter is a view of its (whole) shard.
- mixture-of-experts without activation checkpointing: every layer's fused expert tensors stay alive from their
  forward to their backward, whatever the gathering limits (``held_expert_views``).
- gradients: LOMO and the floor hold one full gradient at a time (the largest parameter's, in the weight
  dtype). LOMO adds the reduce-scatter's output (the shard, on several GPUs) and its fp32 update math, done in
  slices of at most ``UPDATE_CHUNK`` elements (fp32 gradient and weight: 8 B each). DeepSpeed's ZeRO-3 optimizer keeps a partitioned gradient buffer
  (weight dtype), an fp32 gradient buffer for the optimizer, and the reduce bucket
  (``reduce_bucket_size`` elements, allocated whole on a GPU; on CPU only the pages written count); its step
  makes the fp32 gradient of the shard (4 B per element) for the torch optimizer and frees it after.
  LOMO's ``overlap_comm`` keeps the previous parameter's gradient alive until the next one is ready. The
  first gradient of backward is the LM head's (a tied embedding's comes last), so nothing is pending at the
  peak moment: the overlap adds nothing to the peak (the benchmark's lomo and lomo_sync rows check this).
- gradient accumulation (``lomo_accum``: LOMO with ``accumulate=True``, any number of micro-steps, or
  ``clip_mode="buffered"`` at one): a buffer of this device's shards in ``accum_dtype`` (4 B fp32, or 2 B in the
  training dtype) lives through the whole step; the update then runs from it in LOMO's fp32 slices.
- optimizer states: AdamW = fp32 master + m + v (12 B per element of the shard; the master copy is the weight
  itself in fp32 training); SGD without momentum = fp32 master (4 B); LOMO = 0.
- activations and the loss: ``activations.py``, term by term (for a LLaMA layer ``d (7h + 2 kv + 4i) + 8h +
  4 heads`` bytes per token; MoE layers count tokens x experts-per-token routed copies). The peak of backward is
  the larger of the loss backward and the LM-head backward (logits gradient d x vocab per token + the largest
  full gradient).
- AdamW/SGD also have a step phase (no activations; the fp32 gradient, and torch's multi-tensor AdamW makes
  one more fp32 temporary of the shard); the peak is the larger phase.
- framework overhead (GPU only, for the verdict): CUDA context + cuBLAS workspace + NCCL buffers, about
  1 GiB, and the caching allocator's reserve over what is allocated, taken as 10%. Measured peaks
  (``max_memory_allocated``) are compared with the total before these two.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

from ..clip_choice import Choice, Figures, choose
from ..errors import ConfigError
from ..gathering import fill_auto
from . import activations as act
from .inventory import Inventory

# LOMO's update runs in slices of this many elements (optimizer.UPDATE_CHUNK; a test keeps them equal). Not
# imported: the planner is arithmetic and must not pull in torch.
UPDATE_CHUNK = 1 << 22

MODES = ("lomo", "lomo_accum", "adalomo", "sgd", "adamw", "fwd_bwd_comm", "fwd_bwd", "fwd")
OPTIMIZERS = ("lomo", "lomo_accum", "adalomo", "sgd", "adamw")
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
CUDA_OVERHEAD_BYTES = 2**30   # CUDA context (~0.5 GiB on an H100) + cuBLAS workspace + NCCL buffers
ALLOCATOR_RESERVE = 0.10      # max_memory_reserved over max_memory_allocated, typical of a training loop


@dataclass(frozen=True)
class ZeroKnobs:
    """DeepSpeed ZeRO-3 settings that size buffers (DeepSpeed's defaults, not HF's "auto" values)."""
    prefetch_bucket_size: int = int(5e7)
    max_live_parameters: int = int(1e9)
    param_persistence_threshold: int = int(1e5)
    reduce_bucket_size: int = int(5e8)
    max_reuse_distance: int = int(1e9)

    @classmethod
    def from_ds_config(cls, zero: dict) -> "ZeroKnobs":
        d = cls()
        return cls(int(zero.get("stage3_prefetch_bucket_size", d.prefetch_bucket_size)),
                   int(zero.get("stage3_max_live_parameters", d.max_live_parameters)),
                   int(zero.get("stage3_param_persistence_threshold", d.param_persistence_threshold)),
                   int(zero.get("reduce_bucket_size", d.reduce_bucket_size)),
                   int(zero.get("stage3_max_reuse_distance", d.max_reuse_distance)))


@dataclass(frozen=True)
class Setup:
    gpus: int = 1
    gpu_mem_gb: float = 24.0
    seq_len: int = 512
    batch: int = 1
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    offload_param: bool = False
    device: str = "cuda"              # "cpu": figures are bytes of RSS above the process baseline
    fused_adamw: bool = True          # torch AdamW(fused=True) on CUDA; the multi-tensor path makes a temporary
    accum_dtype: str = "fp32"         # lomo_accum's gradient buffer
    zero: ZeroKnobs = field(default_factory=ZeroKnobs)

    def __post_init__(self):
        if self.gpus < 1 or self.seq_len < 1 or self.batch < 1:
            raise ValueError("gpus, seq_len and batch must be >= 1 (check --gpus / --seq-len / --batch)")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.accum_dtype not in ("fp32", self.dtype):
            raise ValueError(f"accum_dtype must be fp32 or the training dtype {self.dtype}, got {self.accum_dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else a


def gathered_parameters(inv: Inventory, z: ZeroKnobs, training: bool = True) -> int:
    """Elements ZeRO-3 holds gathered at the peak, once its trace is complete (see the module docstring).

    The trace is the forward's modules, then the same in reverse for backward. A module released in forward
    stays gathered if its backward use comes before ``max_reuse_distance`` elements of trace have gone by
    (DeepSpeed counts the modules in between: everything after it in forward, twice): exact against
    DeepSpeed in tests/test_planner.py. The prefetcher keeps what it fetched ahead, up to
    ``max_live_parameters`` (DeepSpeed overshoots it by the last module fetched: 2% on a 268M model; see
    scripts/probe_gathered.py)."""
    sizes = inv.module_numels()  # per module, in module (registration) order
    n = sum(sizes)
    prefetch = z.prefetch_bucket_size > 0
    if not training:  # the module running, or what is prefetched ahead (the embedding is fetched on demand)
        return max(min(z.max_live_parameters, n - sizes[0]) if prefetch else 0, sizes[0] + max(sizes[1:], default=0))
    prefetched = min(z.max_live_parameters, n) if prefetch else 0
    after, reuse_tail = 0, 0
    for k in reversed(sizes):
        if 2 * after < z.max_reuse_distance:
            reuse_tail += k
        after += k
    return max(reuse_tail, prefetched, inv.head_numel)  # the LM head at least, for its own backward


def held_expert_views(inv: Inventory, gathered: int) -> int:
    """Elements of fused expert tensors (3-D) that stay alive outside ZeRO-3's gathered tail of ``gathered``
    elements, from their forward to their backward, when activations are not checkpointed. The expert kernels
    (eager: ``gate_up_proj[e]``; grouped_mm: ``gate_up_proj.transpose(-2, -1)``) hand autograd a *view* of the
    gathered parameter, and a saved view keeps the gathered storage: ZeRO-3's release swaps the parameter's own
    ``data`` for an empty tensor and frees nothing. ``nn.Linear`` saves the parameter itself, whose storage the
    release does swap, so dense layers hold nothing extra. Measured: docs/benchmarks.md ("Beyond LLaMA")."""
    tail, extra = 0, 0
    modules: dict[str, list] = {}
    for p in inv.params:
        modules.setdefault(p.module, []).append(p)
    for params in reversed(list(modules.values())):  # backward order: the gathered tail comes first
        size = sum(p.numel for p in params)
        if tail + size <= gathered:
            tail += size
            continue
        extra += sum(p.numel for p in params if len(p.shape) >= 3)
    return extra


def adalomo_state_numel(inv: Inventory, gpus: int) -> int:
    """fp32 elements of AdaLomo's state on one device: rows + cols of every matrix (a 3-D expert tensor: of each of
    its matrices over the last two dimensions; replicated on the ranks of its partition group: each needs the whole
    parameter's factors) and this rank's span of each vector's full second moment. Per-parameter step counters
    (one float each) are left out."""
    total = 0
    for p in inv.params:
        if len(p.shape) >= 2:
            total += (p.numel // (p.shape[-2] * p.shape[-1])) * (p.shape[-2] + p.shape[-1])
        else:
            total += ceil_div(p.numel, gpus)
    return total


def breakdown(inv: Inventory, setup: Setup, mode: str) -> dict:
    """Predicted per-device peak for ``mode`` (one of MODES), as a dict of byte terms with ``total``
    (what ``max_memory_allocated`` / RSS above baseline should show) and ``total_with_overhead``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d, g, z, T = DTYPE_BYTES[setup.dtype], setup.gpus, setup.zero, setup.tokens
    numels = inv.numels
    n = sum(numels)
    n_shard = sum(ceil_div(k, g) for k in numels)        # elements of this device's shards, padding included
    persistent_numel = sum(p.numel for p in inv.persistent(z.param_persistence_threshold))
    largest = inv.largest.numel
    training = mode != "fwd"

    t: dict[str, int] = {}
    t["param_shards"] = 0 if setup.offload_param else d * n_shard
    t["persistent_params"] = d * persistent_numel
    # One rank: DeepSpeed's "gather" makes the parameter a view of its whole shard (NoGatherHandle), no copy
    alias = g == 1 and not setup.offload_param
    gathered = gathered_parameters(inv, z, training)
    if training and not setup.activation_checkpointing:  # MoE: saved views of gathered expert tensors
        gathered = min(sum(numels), gathered + held_expert_views(inv, gathered))
    t["gathered_working_set"] = 0 if alias else d * gathered

    # Gradients: buffers that live through the whole step, and the one full gradient in flight.
    grad_buffers = 0
    if mode in ("adamw", "sgd"):
        bucket = z.reduce_bucket_size if setup.device == "cuda" else min(z.reduce_bucket_size, n)
        grad_buffers = d * n_shard + d * bucket
    elif mode == "lomo_accum":  # the accumulation buffer: this device's shards (padding excluded; ignored here)
        grad_buffers = DTYPE_BYTES[setup.accum_dtype] * n_shard
    grad_in_flight = d * largest if training else 0
    if mode == "lomo_accum":  # backward only reduce-scatters and adds: no update math alongside
        grad_in_flight += d * ceil_div(largest, g) if g > 1 else 0
    elif mode in ("lomo", "adalomo"):  # reduce-scatter output, and the update's fp32 gradient and weight, by slices
        shard = ceil_div(largest, g)
        # AdaLomo's slice also holds G^2 (or a row-padded copy) and the update U: two more fp32 temporaries
        grad_in_flight += (d * shard if g > 1 else 0) + (16 if mode == "adalomo" else 8) * min(shard, UPDATE_CHUNK)
    elif mode == "fwd_bwd_comm" and g > 1:  # the reduce-scatter's output, never applied
        grad_in_flight += d * ceil_div(largest, g)
    t["gradient_buffers"] = grad_buffers
    t["gradient_in_flight"] = grad_in_flight

    master = 0 if d == 4 else 4 * n_shard
    t["optimizer_states"] = {"adamw": master + 8 * n_shard, "sgd": master,
                             "adalomo": 4 * adalomo_state_numel(inv, g)}.get(mode, 0)
    adam_temp = 0 if (setup.device == "cuda" and setup.fused_adamw) else 4 * n_shard
    # The step makes the fp32 gradient of the shard, and multi-tensor AdamW one more fp32 temporary.
    t["optimizer_step_temporaries"] = (4 * n_shard + (adam_temp if mode == "adamw" else 0)) if mode in ("adamw", "sgd") else 0
    if mode == "lomo_accum":  # the update from the buffer: fp32 gradient and weight of one slice
        t["optimizer_step_temporaries"] = 8 * min(ceil_div(largest, g), UPDATE_CHUNK)

    dims = inv.dims
    if not training:  # no_grad: nothing saved; a layer's transients, then the logits, their fp32 copy and log-probs
        t["activations"], t["loss_logits"] = act.forward_bytes(dims, d, T)
    else:
        t["activations"] = act.training_activations(dims, d, T, setup.activation_checkpointing)
        t["loss_logits"] = act.loss_bytes(dims, T)

    static = t["param_shards"] + t["persistent_params"] + grad_buffers + t["optimizer_states"]
    if training:
        # Backward's peak: the cross-entropy backward, or the LM head's backward with its full gradient.
        head = d * dims.vocab * T + grad_in_flight
        backward = static + t["gathered_working_set"] + t["activations"] + max(t["loss_logits"], head)
        step = static + t["optimizer_step_temporaries"]
        t["peak_moment"] = "loss backward" if t["loss_logits"] >= head else "lm_head backward"
        if step > backward:
            t["peak_moment"] = "optimizer step"
        total = max(backward, step)
    else:
        total = static + t["gathered_working_set"] + max(t["activations"], t["loss_logits"])
        t["peak_moment"] = "forward (loss)"
    t["total"] = total
    overhead = CUDA_OVERHEAD_BYTES if setup.device == "cuda" else 0
    t["framework_overhead"] = overhead
    t["total_with_overhead"] = int(total * (1 + ALLOCATOR_RESERVE)) + overhead if setup.device == "cuda" else total
    t["fits"] = t["total_with_overhead"] <= setup.gpu_mem_gb * 2**30
    return t


def check_fits(model_config, *, mode: str, gpus: int, gpu_mem_bytes: int, seq_len: int, batch: int, dtype: str,
               accum_dtype: str = "fp32", activation_checkpointing: bool = False, ds_config: dict | None = None) -> str:
    """LOMOTrainer's start-up check (``check_memory``, off by default): the planner's verdict for this run, as one
    line. Any HF causal LM whose config instantiates on the meta device is planned; ConfigError (one line, starting
    "check_memory:") when the config cannot be read or the setting is predicted not to fit."""
    from .inventory import build_inventory

    zero = (ds_config or {}).get("zero_optimization", {})
    setup = Setup(gpus=gpus, gpu_mem_gb=gpu_mem_bytes / 2**30, seq_len=seq_len, batch=batch, dtype=dtype,
                  accum_dtype=accum_dtype, activation_checkpointing=activation_checkpointing,
                  offload_param=(zero.get("offload_param") or {}).get("device", "none") == "cpu",
                  zero=ZeroKnobs.from_ds_config({k: v for k, v in zero.items() if v != "auto"}))
    try:
        inv = build_inventory(model_config)
    except ConfigError as e:
        raise ConfigError(f"check_memory: {e} (or set check_memory false)") from None
    t = breakdown(inv, setup, mode)
    line = (f"{mode} on {gpus} x {setup.gpu_mem_gb:.1f} GiB, {dtype}, seq {seq_len} x batch {batch}: predicted "
            f"{gib(t['total_with_overhead']):.2f} GiB per GPU (buffer {gib(t['gradient_buffers']):.2f} GiB)")
    if not t["fits"]:
        raise ConfigError(f"check_memory: {line} does not fit; lower the batch or sequence, use a 16-bit "
                          "accumulation_dtype or clip_mode other than \"buffered\", or drop check_memory to try anyway")
    return line


def clip_figures(inv: Inventory, setup: Setup, optimizer: str = "lomo") -> Figures:
    """clip_mode "auto"'s figures: the planned peak of two-pass and of buffered global clipping, and the buffer
    (``setup.accum_dtype``). AdaLomo: its factored state is added to the buffered peak (``lomo_accum`` is LOMO's)."""
    two_pass = breakdown(inv, setup, "adalomo" if optimizer == "adalomo" else "lomo")
    buffered = breakdown(inv, setup, "lomo_accum")
    extra = int(two_pass["optimizer_states"] * (1 + ALLOCATOR_RESERVE))  # AdaLomo's state; 0 for LOMO
    return Figures(gpu_mem_bytes=int(setup.gpu_mem_gb * 2**30), gpus=setup.gpus, n_params=inv.n_params,
                   buffer_dtype=setup.accum_dtype, buffer_bytes=buffered["gradient_buffers"],
                   two_pass_peak=two_pass["total_with_overhead"], buffered_peak=buffered["total_with_overhead"] + extra)


def plan_clip_mode(model_config, device_type: str, seq_len: int | None, *, gpus: int, gpu_mem_bytes: int, batch: int,
                   dtype: str, buffer_dtype: str, optimizer: str = "lomo", activation_checkpointing: bool = False,
                   ds_config: dict | None = None) -> Choice:
    """LOMOTrainer's start-up decision for clip_mode "auto" (clip_choice.choose on this run's figures). Off a GPU,
    without the first batch's length (None), or for a config the planner cannot read: two passes, said why."""
    if device_type != "cuda":
        return choose(None, device_type)
    if seq_len is None:
        return choose(None, problem="the first batch's length is unknown: train() reads it")
    try:
        from .inventory import build_inventory

        zero = (ds_config or {}).get("zero_optimization") or {}
        setup = Setup(gpus=gpus, gpu_mem_gb=gpu_mem_bytes / 2**30, seq_len=seq_len, batch=batch, dtype=dtype,
                      accum_dtype=buffer_dtype, activation_checkpointing=activation_checkpointing,
                      offload_param=(zero.get("offload_param") or {}).get("device", "none") == "cpu",
                      zero=ZeroKnobs.from_ds_config({k: v for k, v in zero.items() if v != "auto"}))
        figures = clip_figures(build_inventory(model_config), setup, optimizer)
    except Exception as e:  # noqa: BLE001 (any model the planner cannot read: two passes, said in the line)
        return choose(None, problem=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return choose(figures)


def plan(inv: Inventory, setup: Setup, modes=OPTIMIZERS) -> dict:
    model = {k: v for k, v in inv.to_dict().items() if k != "params"}
    model["largest"] = {"name": inv.largest.name, "shape": list(inv.largest.shape)}
    return {"model": model, "setup": asdict(setup), "modes": {m: breakdown(inv, setup, m) for m in modes}}


def describe(inv: Inventory) -> str:
    """One line: the model's size and the dimensions the activation terms use."""
    m = inv.dims
    moe = (f", {m.moe_layers} MoE layers x {m.experts} experts ({m.experts_per_token} per token, width "
           f"{m.moe_intermediate})" if m.moe_layers else "")
    dense = f"intermediate {m.intermediate}, " if m.intermediate else ""
    return (f"model {inv.name} ({inv.model_type}): {inv.n_params / 1e9:.3f} B params (hidden {m.hidden}, "
            f"{dense}layers {m.layers}, heads {m.heads}/{m.kv_heads} kv x head_dim "
            f"{m.head_dim}, vocab {m.vocab}{moe}{', tied embeddings' if inv.tie_embeddings else ''})")


def format_plan(inv: Inventory, setup: Setup, modes=OPTIMIZERS) -> str:
    d, g = DTYPE_BYTES[setup.dtype], setup.gpus
    n, dims = inv.n_params, inv.dims
    lines = [describe(inv),
             f"setup: {g} x {setup.gpu_mem_gb:g} GB, {setup.dtype} ({d} B), seq {setup.seq_len} x batch {setup.batch}"
             f" = {setup.tokens} tokens/GPU, activation checkpointing {'on' if setup.activation_checkpointing else 'off'},"
             f" parameters offloaded {'yes' if setup.offload_param else 'no'}", ""]
    per_layer = max(act.layer_bytes(dims, d, moe) for moe in {dims.moe_layers > 0, dims.moe_layers < dims.layers})
    largest = inv.largest
    how = {
        "param_shards": "0 (offloaded to CPU)" if setup.offload_param else f"{d} B x {n / 1e9:.3f} B / {g}",
        "persistent_params": f"{d} B x params <= {setup.zero.param_persistence_threshold:.0e} elements, whole",
        "gathered_working_set": f"{d} B x what ZeRO-3 keeps gathered into backward (max_live_parameters"
                                f" {setup.zero.max_live_parameters:.0e}, max_reuse_distance {setup.zero.max_reuse_distance:.0e})",
        "gradient_buffers": f"SGD/AdamW: {d} B x {n / 1e9:.3f} B / {g} + {d} B x reduce bucket; lomo_accum: "
                            f"{DTYPE_BYTES[setup.accum_dtype]} B ({setup.accum_dtype}) x {n / 1e9:.3f} B / {g}",
        "gradient_in_flight": f"{d} B x largest parameter {largest.numel / 1e6:.1f} M ({largest.name})"
                              " (LOMO: + its reduced shard, and fp32 gradient and weight of one update slice)",
        "optimizer_states": "AdamW 12 B / SGD 4 B / LOMO 0 x params / gpus (fp32 master counted only for 16-bit)",
        "optimizer_step_temporaries": "step: fp32 gradient of the shard (+1 fp32 shard: multi-tensor AdamW; "
                                      "lomo_accum: one fp32 slice)",
        "activations": (f"{d} B x h x {setup.tokens} tokens x {dims.layers} layers + one layer {per_layer} B/token"
                        if setup.activation_checkpointing else
                        f"up to {per_layer} B/token/layer x {setup.tokens} tokens x {dims.layers} layers"),
        "loss_logits": f"12 B x vocab {dims.vocab} x {setup.tokens} tokens (fp32 cross entropy)",
    }
    for mode in modes:
        t = breakdown(inv, setup, mode)
        lines.append(f"== {mode}")
        for key, text in how.items():
            lines.append(f"  {key:28s} {gib(t[key]):9.3f} GiB   {text}")
        lines.append(f"  {'peak (' + t['peak_moment'] + ')':28s} {gib(t['total']):9.3f} GiB   "
                     "the larger of backward (all but step temporaries) and the optimizer step")
        if setup.device == "cuda":
            lines.append(f"  {'+ overhead':28s} {gib(t['total_with_overhead']):9.3f} GiB   "
                         f"x{1 + ALLOCATOR_RESERVE:.2f} allocator reserve + {gib(CUDA_OVERHEAD_BYTES):.1f} GiB CUDA/NCCL")
        verdict = "fits" if t["fits"] else "does not fit"
        lines.append(f"  verdict: {verdict} in {setup.gpu_mem_gb:g} GB\n")
    return "\n".join(lines)


def zero_knobs(ds_config_path: str | None, inv: Inventory, gpus: int, dtype: str, gpu_mem_gb: float) -> ZeroKnobs:
    """The zero_optimization knobs of a DeepSpeed JSON ("auto" gathering limits filled as LOMOTrainer fills them;
    other "auto" and missing keys: DeepSpeed's defaults), or DeepSpeed's defaults without one."""
    if not ds_config_path:
        return ZeroKnobs()
    with open(ds_config_path) as f:
        knobs = json.load(f).get("zero_optimization", {})
    knobs = fill_auto(knobs, inv.numels, gpus, DTYPE_BYTES[dtype], int(gpu_mem_gb * 2**30))
    return ZeroKnobs.from_ds_config({k: v for k, v in knobs.items() if v != "auto"})


def parse_args(argv=None) -> tuple[argparse.Namespace, Inventory, Setup, list[str]]:
    """The command line to (arguments, model inventory, setup, modes); exits with argparse's one-line error. The
    docs' tables (``doc_tables``) go through here, so a table and the command it quotes cannot differ."""
    from .presets import PRESETS

    ap = argparse.ArgumentParser(prog="python -m lomo_trainer.planner", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), a hub name of one, or a "
                    "local folder / config.json of any HF causal LM")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--gpu-mem-gb", type=float, default=24.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16")
    ap.add_argument("--accum-dtype", choices=sorted(DTYPE_BYTES), default="fp32",
                    help="lomo_accum's gradient buffer: fp32, or the training dtype (--dtype) to halve it")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--offload-param", action="store_true")
    ap.add_argument("--ds-config", help="a DeepSpeed JSON whose zero_optimization knobs size ZeRO-3's buffers "
                    "(\"auto\" gathering limits: filled as LOMOTrainer fills them, gathering.py; other "
                    "\"auto\" and missing keys: DeepSpeed's defaults)")
    ap.add_argument("--modes", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--json", action="store_true", help="print the breakdown as JSON instead")
    ap.add_argument("--clip-auto", action="store_true", help="print what clip_mode \"auto\" chooses for this run "
                    "(the buffer in --accum-dtype; clip_choice.py) and the planned peak of each path, in one line")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    try:
        if any(m not in MODES for m in modes):
            raise ValueError(f"--modes: choose from {','.join(MODES)}, got {args.modes!r}")
        inv = load_inventory(args.model)
        setup = Setup(gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, seq_len=args.seq_len, batch=args.batch,
                      dtype=args.dtype, accum_dtype=args.accum_dtype,
                      activation_checkpointing=args.activation_checkpointing, offload_param=args.offload_param,
                      zero=zero_knobs(args.ds_config, inv, args.gpus, args.dtype, args.gpu_mem_gb))
    except (ValueError, OSError) as e:
        ap.error(str(e))
    return args, inv, setup, modes


def clip_optimizer(modes: list[str]) -> str:
    """``--clip-auto`` plans AdaLomo's buffered path when the modes name AdaLomo and not LOMO."""
    return "adalomo" if "adalomo" in modes and "lomo" not in modes else "lomo"


def main(argv=None) -> None:
    args, inv, setup, modes = parse_args(argv)
    if args.clip_auto:
        print(choose(clip_figures(inv, setup, clip_optimizer(modes))).line())
    elif args.json:
        print(json.dumps(plan(inv, setup, modes), indent=1))
    else:
        print(format_plan(inv, setup, modes))


def load_inventory(spec: str) -> Inventory:
    """``--model`` to an inventory: a preset, a hub name of one, a config.json or a local folder (presets.py)."""
    from .inventory import build_inventory
    from .presets import load_config

    name, cfg = load_config(spec)
    return build_inventory(cfg, name=name)


if __name__ == "__main__":
    main()
