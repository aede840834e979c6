"""LOMO on DeepSpeed ZeRO-3 (CPU, gloo) against an independent float64 SGD reference.

DeepSpeed's default stage3_param_persistence_threshold (1e5) is kept throughout, so norm weights and
small tensors stay gathered between steps: a stale-weight bug shows as a mismatch from the second step on.
"""
import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import LOMO
from models import DS_CONFIG, allow_cpu_fp16, batch, reference_sgd
from zero3_runs import STEPS, assert_matches_reference, build, train_zero3

@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zero3_matches_sgd_tied_llama(world):
    opts = dict(lr=0.5)
    params, losses, _ = run_ranks(train_zero3, world, "llama", opts)[0]
    assert_matches_reference(params, "llama", world, opts)


@pytest.mark.multirank
def test_zero3_two_simulated_nodes_use_the_group_rank_not_local_rank():
    # 2 nodes x 2 ranks: LOCAL_RANK repeats (0, 1, 0, 1); a shard index taken from it would update wrong slices
    opts = dict(lr=0.5)
    params, _, _ = run_ranks(train_zero3, 4, "llama", opts, local_world=2)[0]
    assert_matches_reference(params, "llama", 4, opts)


@pytest.mark.multirank
def test_zero3_closure_through_engine_and_untied_embeddings():
    opts = dict(lr=0.5, weight_decay=0.1)
    params, _, _ = run_ranks(train_zero3, 2, "llama_untied", opts, via_engine=True)[0]
    assert_matches_reference(params, "llama_untied", 2, opts)


@pytest.mark.multirank
@pytest.mark.parametrize("world", [3, 4])
def test_zero3_uneven_shards_checkpointing_clip_norm(world):
    # OddLM has 5- and 1-element parameters: on 4 ranks whole shards are padding.
    opts = dict(lr=0.5, clip_grad_norm=0.3, weight_decay=0.01)
    results = run_ranks(train_zero3, world, "odd", opts, checkpointing=True)
    params, _, grad_norm = results[0]
    assert grad_norm > 0.3, "the clip threshold must bind for this test to mean anything"
    assert all(r[2] == pytest.approx(grad_norm, rel=1e-6) for r in results), "ranks disagree on the global norm"
    assert_matches_reference(params, "odd", world, opts, checkpointing=True)


@pytest.mark.multirank
def test_zero3_llama_gradient_checkpointing_clip_value():
    opts = dict(lr=0.5, clip_grad_value=2e-3, weight_decay=0.05)
    params, _, _ = run_ranks(train_zero3, 2, "llama", opts, checkpointing=True)[0]
    assert_matches_reference(params, "llama", 2, opts, checkpointing=True)


@pytest.mark.multirank
def test_zero3_per_param_clipping_one_pass():
    opts = dict(lr=0.5, clip_grad_norm=0.05, clip_mode="per_param")
    params, _, grad_norm = run_ranks(train_zero3, 2, "odd", opts)[0]
    assert grad_norm is None, "per-parameter clipping must not run a norm pass"
    assert_matches_reference(params, "odd", 2, opts)


@pytest.mark.multirank
@pytest.mark.parametrize("kind,opts", [("llama", dict(lr=0.5, clip_grad_value=2e-3, weight_decay=0.05)),
                                       ("odd", dict(lr=0.5, clip_grad_norm=0.05, clip_mode="per_param")),
                                       ("llama", dict(lr=0.5, clip_grad_norm=2.0))])
def test_zero3_update_in_slices_matches_sgd(kind, opts):
    # slices of 100 elements: every weight matrix is updated (and its norm summed) piece by piece
    params, _, _ = run_ranks(train_zero3, 2, kind, opts, chunk=100)[0]
    assert_matches_reference(params, kind, 2, opts)


def train_zero3_overlap(rank, world, overlap, ds_overlap):
    """Train with a spy on the reductions: which were launched asynchronously, and how many were in flight
    (launched, not yet applied) when each gradient's hook fired."""
    from lomo_trainer import _zero
    from lomo_trainer.optim.sinks import NormSink, UpdateSink

    launched, in_flight, applied = [], [], [0]
    reduce = _zero.reduce_to_shard

    def spy_reduce(p, grad, async_op=False):
        in_flight.append(len(launched) - applied[0])
        launched.append(async_op)
        return reduce(p, grad, async_op)

    def spy_apply(apply):
        def spied(self, *args):
            applied[0] += 1
            return apply(self, *args)
        return spied

    # forked rank: the parent is untouched
    _zero.reduce_to_shard = spy_reduce
    NormSink.apply, UpdateSink.apply = spy_apply(NormSink.apply), spy_apply(UpdateSink.apply)
    model, vocab = build("llama")
    cfg = dict(DS_CONFIG, zero_optimization={"stage": 3, "overlap_comm": ds_overlap})
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    opt = LOMO(engine, lr=0.5, clip_grad_norm=2.0, overlap_comm=overlap)  # norm pass + update pass
    for step in range(STEPS):
        b = batch(step, rank, vocab)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        assert all(p.grad is None for p in engine.module.parameters())
    assert applied[0] == len(launched), "a reduction was never applied"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    return params, set(launched), max(in_flight)


@pytest.mark.multirank
def test_zero3_overlap_comm_is_exact_and_keeps_one_reduction_in_flight():
    # LOMO's own flag, and DeepSpeed's zero_optimization.overlap_comm when the flag is left unset
    runs = {"on": run_ranks(train_zero3_overlap, 2, True, False)[0],
            "off": run_ranks(train_zero3_overlap, 2, False, True)[0],
            "from_config_off": run_ranks(train_zero3_overlap, 2, None, False)[0]}
    assert runs["on"][1:] == ({True}, 1), "overlap must launch every reduction async, one in flight at a time"
    assert runs["off"][1:] == ({False}, 0)
    assert runs["from_config_off"][1:] == ({False}, 0), "overlap_comm: false in the DeepSpeed config was ignored"
    for name, expected in runs["off"][0].items():
        assert torch.equal(runs["on"][0][name], expected), f"overlap changed {name}"
    assert_matches_reference(runs["on"][0], "llama", 2, dict(lr=0.5, clip_grad_norm=2.0))


def train_zero3_half(rank, world, dtype_key, opts):
    if dtype_key == "fp16":
        allow_cpu_fp16()
    model, vocab = build("llama")
    cfg = dict(DS_CONFIG, **{dtype_key: {"enabled": True}})
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    params = list(engine.module.parameters())

    def snapshot():
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    half = {torch.float16 if dtype_key == "fp16" else torch.bfloat16}
    assert {p.dtype for p in params} == half, "the engine trains the weights in the half dtype, no fp32 copy"
    opt = LOMO(engine, **opts)
    log = []
    for step in range(3):
        b = batch(step, rank, vocab)
        before = snapshot()
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        after = snapshot()
        unchanged = all(torch.equal(before[n], after[n]) for n in before)
        log.append((opt.last_step_skipped, unchanged, opt.loss_scale))
    return log, {n: p.double() for n, p in snapshot().items()}


@pytest.mark.multirank
def test_zero3_fp16_overflow_skips_then_trains():
    # 2^40 overflows fp16 gradients at once; hysteresis 1 halves the scale per overflow.
    fp16 = {"initial_scale_power": 40, "hysteresis": 1, "loss_scale_window": 100}
    results = run_ranks(train_zero3_half, 2, "fp16", dict(lr=0.5, fp16=fp16))
    log = results[0][0]
    assert log[0] == (True, True, 2.0 ** 39), log  # skipped, bit-identical, scale lowered
    assert results[1][0] == log, "ranks disagree on overflow"


@pytest.mark.multirank
def test_zero3_bf16_matches_sgd_to_bf16_precision():
    opts = dict(lr=0.5, stochastic_rounding=True)
    log, params = run_ranks(train_zero3_half, 2, "bf16", opts)[0]
    assert not any(skipped for skipped, _, _ in log) and not any(unchanged for _, unchanged, _ in log)
    model, vocab = build("llama")
    ref = reference_sgd(model.to(torch.bfloat16).float(), STEPS, 2, vocab, lr=0.5)
    for name, expected in ref.items():
        assert (params[name] - expected).abs().max().item() < 0.03 * (1 + expected.abs().max().item()), name
