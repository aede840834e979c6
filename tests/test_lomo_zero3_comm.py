"""ZeRO-3 communication around the fused update: parameter offload, where collectives get their tensors, the
order of per-parameter clipping's all-reduce, the all-gather stream's wait, and ZeRO++ hpZ (issue 15)."""
import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import LOMO
from models import VOCAB, allow_cpu_fp16, batch, tiny_llama
from models import DS_CONFIG
from zero3_runs import assert_matches_reference, train_zero3

OFFLOAD = {"offload_param": {"device": "cpu"}}


@pytest.mark.multirank
@pytest.mark.parametrize("opts", [dict(lr=0.5, clip_grad_norm=0.05, clip_mode="per_param"),
                                  dict(lr=0.5, clip_grad_norm=2.0, weight_decay=0.05),
                                  dict(lr=0.5, clip_grad_value=2e-3)])
def test_zero3_offload_param_updates_as_without_offload(opts):
    offloaded = run_ranks(train_zero3, 2, "llama", opts, zero=OFFLOAD)[0][0]
    plain = run_ranks(train_zero3, 2, "llama", opts)[0][0]
    for name, expected in plain.items():
        assert torch.equal(offloaded[name], expected), f"offload changed {name}"
    assert_matches_reference(offloaded, "llama", 2, opts)


class HostCopy(torch.Tensor):
    """Marks the host copy of a gradient (offload_param) and everything computed from it."""


def train_spied(rank, world, opts, zero, precision):
    """One ZeRO-3 run with every torch.distributed collective spied on. The gradient's host copy is faked on
    every update (on CPU the offload device is the compute device): a collective fed from it would, under
    NCCL, get a host tensor."""
    import torch.distributed as dist

    import lomo_trainer.optim.adalomo
    import lomo_trainer.optim.rules
    from lomo_trainer import _zero

    for module in (lomo_trainer.optim.rules, lomo_trainer.optim.adalomo):  # every rule's host copy
        module.to_weight_device = lambda g, w: g.to(w.device).as_subclass(HostCopy)
    seen = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            for t in list(args) + list(kwargs.values()):
                for x in (t if isinstance(t, (list, tuple)) else [t]):
                    if isinstance(x, torch.Tensor):
                        seen.append(name)
                        assert not isinstance(x, HostCopy), f"{name} got a tensor computed from the host copy"
                        assert x.device.type == "cpu", f"{name} got a {x.device} tensor on gloo"
            return fn(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast"):
        setattr(dist, name, spy(name, getattr(dist, name)))
    _zero._reduce_scatter = spy("reduce_scatter", _zero._reduce_scatter)
    if precision == "fp16":
        allow_cpu_fp16()
    cfg = dict(DS_CONFIG, zero_optimization={"stage": 3, **zero})
    if precision:
        cfg[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=tiny_llama(), config=cfg)
    opt = LOMO(engine, **opts)
    for step in range(2):
        b = batch(step, rank, VOCAB)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
    return set(seen)


MATRIX = [(dict(lr=0.5, clip_grad_norm=0.05, clip_mode="per_param"), OFFLOAD, None),
          (dict(lr=0.5, clip_grad_norm=0.05, clip_mode="per_param", overlap_comm=False), OFFLOAD, None),
          (dict(lr=0.5, clip_grad_norm=2.0), OFFLOAD, None),
          (dict(lr=0.5, clip_grad_value=2e-3, overlap_comm=False), {}, None),
          (dict(lr=0.5), OFFLOAD, "bf16"),
          (dict(lr=0.5, stochastic_rounding=True, clip_grad_norm=0.05, clip_mode="per_param"), OFFLOAD, "bf16"),
          (dict(lr=0.5, fp16={"initial_scale_power": 8}, clip_grad_norm=2.0), OFFLOAD, "fp16")]


@pytest.mark.multirank
@pytest.mark.parametrize("opts,zero,precision", MATRIX)
def test_zero3_no_collective_gets_a_host_copy(opts, zero, precision):
    seen = run_ranks(train_spied, 2, opts, zero, precision)[0]
    assert {"reduce_scatter", "all_reduce"} <= seen, f"the spy saw no LOMO collective: {seen}"


def train_collective_order(rank, world, overlap):
    import torch.distributed as dist

    from lomo_trainer import _zero

    log = []
    reduce_scatter, all_reduce = _zero._reduce_scatter, dist.all_reduce

    def rs(*a, **k):
        log.append("rs")
        return reduce_scatter(*a, **k)

    def ar(*a, **k):
        log.append("ar")
        return all_reduce(*a, **k)

    _zero._reduce_scatter, dist.all_reduce = rs, ar
    engine, *_ = deepspeed.initialize(model=tiny_llama(), config=DS_CONFIG)
    opt = LOMO(engine, lr=0.5, clip_grad_norm=0.05, clip_mode="per_param", overlap_comm=overlap)
    n = len(list(engine.module.parameters()))
    b = batch(0, rank, VOCAB)
    opt.step(lambda: (log.clear(), engine.module(input_ids=b, labels=b).loss)[1])
    return log, n


@pytest.mark.multirank
@pytest.mark.parametrize("overlap", [True, False])
def test_zero3_per_param_norm_all_reduce_never_queues_behind_the_next_reduce_scatter(overlap):
    log, n = run_ranks(train_collective_order, 2, overlap)[0]
    # the step's sync (loss check), then each parameter's reduce-scatter followed by its norm's all-reduce
    assert log == ["ar"] + ["rs", "ar"] * n, log


class FakeStream:
    def __init__(self, log):
        self.log = log

    def wait_stream(self, other):
        self.log.append("wait")


def train_stream_order(rank, world):

    log = []
    engine, *_ = deepspeed.initialize(model=tiny_llama(), config=DS_CONFIG)
    coordinator = engine.optimizer.get_param_coordinator()
    # CPU has no streams (DeepSpeed keeps None there and ignores the stream it is given): a recording fake
    coordinator._PartitionedParameterCoordinator__allgather_stream = FakeStream(log)
    from lomo_trainer.optim import GuardedWriter

    write = GuardedWriter.write

    def spy_write(self, *args):
        log.append("update")
        return write(self, *args)

    GuardedWriter.write = spy_write
    opt = LOMO(engine, lr=0.5, clip_grad_norm=2.0)
    for step in range(2):
        b = batch(step, rank, VOCAB)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        log.append("step end")
    return log


@pytest.mark.multirank
def test_zero3_allgather_stream_waits_after_the_last_update():
    log = run_ranks(train_stream_order, 2)[0]
    steps = "|".join(log).split("|step end")
    assert len(steps) == 3 and steps[-1] == ""
    for s in steps[:-1]:
        events = [e for e in s.split("|") if e]
        assert events.count("wait") == 1 and events[-1] == "wait" and "update" in events, events


def train_hpz(rank, world, steps):
    from deepspeed.utils import groups

    from lomo_trainer import _zero

    # DeepSpeed 0.19.8 creates hpZ's intra-node group only in zero.Init or its own ZeRO optimizer; an engine
    # built without an optimizer fails in initialize unless the group exists (zero.Init makes it).
    deepspeed.init_distributed()
    groups._create_zero_param_parallel_group(2)
    secondaries = []
    refresh = _zero.refresh_partitions

    def spy_refresh(engine):
        secondaries.append(sum(getattr(p, "ds_secondary_tensor", None) is not None for p in engine.module.parameters()))
        refresh(engine)

    _zero.refresh_partitions = spy_refresh
    params, _, _ = train_zero3(rank, world, "llama", dict(lr=0.5), steps=steps, zero={"zero_hpz_partition_size": 2})
    return params, secondaries


@pytest.mark.multirank
def test_zero3_hpz_secondary_copies_never_serve_stale_weights():
    params, secondaries = run_ranks(train_hpz, 4, 3, local_world=2)[0]
    assert all(secondaries), "hpZ made no secondary copies: the test could not see stale ones"
    assert_matches_reference(params, "llama", 4, dict(lr=0.5))
