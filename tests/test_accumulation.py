"""Gradient accumulation (issue 11): k micro-steps of batch b on each of `world` ZeRO-3 ranks must equal one step
of the whole batch (k x b x world rows) in float64, with the loss the token mean over every row, as the stock
Trainer weighs it (num_items_in_batch). Rows are padded and of unequal length, with a prompt whose labels are
-100, so every micro-batch counts a different number of tokens: a local token count, a dropped micro-step or a
buffer that keeps an old step's gradient shows. The references below are written from the definitions here and
share no code with lomo_trainer."""
import copy

import deepspeed
import pytest
import torch
import torch.nn.functional as F

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.optim import AdaLomo
import reference as reference_rules
from models import DS_CONFIG, VOCAB, allow_cpu_fp16, tiny_llama

K, B = 3, 2  # micro-steps per step, rows per micro-batch


def micro_batch(step, rank, micro, b=B):
    """b rows of 3..12 tokens, right-padded; the first 1-3 tokens are a prompt (labels -100)."""
    g = torch.Generator().manual_seed(10000 * step + 100 * rank + micro)
    lengths = torch.randint(3, 13, (b,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), -100)
    mask = torch.zeros(b, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(0, VOCAB, (n,), generator=g)
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        ids[r, :n], mask[r, :n], labels[r, prompt:n] = row, 1, row[prompt:]
    return ids, mask, labels


def token_loss_sum(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten(), reduction="sum")


def tokens(labels):
    return int((labels[:, 1:] != -100).sum())


def global_tokens(step, world, k=K):
    return sum(tokens(micro_batch(step, r, m)[2]) for r in range(world) for m in range(k))


# ---------------------------------------------------------------- the float64 reference: one big batch per step
def one_big_batch(step, world, k=K):
    """All k x world micro-batches as one right-padded batch."""
    parts = [micro_batch(step, r, m) for r in range(world) for m in range(k)]
    width = max(p[0].shape[1] for p in parts)
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return (torch.cat([pad(p[0], 0) for p in parts]), torch.cat([pad(p[1], 0) for p in parts]),
            torch.cat([pad(p[2], -100) for p in parts]))


def reference(model, steps, world, rule, lr, weight_decay=0.0, clip_grad_norm=None, k=K, skip=()):
    """float64 SGD or AdaLomo (tests/reference.py) on the token-mean loss of one big batch per step."""
    def loss_of(model, step):
        ids, mask, labels = one_big_batch(step, world, k)
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # mean over label tokens

    step_rule = reference_rules.sgd(lr, weight_decay) if rule == "sgd" else reference_rules.adalomo(lr, weight_decay)
    return reference_rules.train(model, steps, loss_of, step_rule, skip=skip, max_norm=clip_grad_norm)


# ---------------------------------------------------------------- ZeRO-3 ranks
def train(rank, world, rule, opts, steps=2, k=K, dtype=None, poison=None, fp16=None, sabotage=None):
    """``steps`` steps of ``k`` micro-steps; returns the gathered weights and a per-step log."""
    if dtype == "fp16":
        allow_cpu_fp16()
    from lomo_trainer.optim.sinks import GradientBuffer

    if sabotage == "keep_buffer":  # mutation: the buffer is never cleared (forked rank: the parent is untouched)
        GradientBuffer.clear = lambda self: self.touched.clear()
    if sabotage == "drop_last_add":  # mutation: the last micro-step's gradient never reaches the buffer
        apply = GradientBuffer.apply
        micro = {"n": 0, "params": set()}

        def _apply(self, p, g, w, ctx):
            if p in micro["params"]:  # a parameter seen again: the next micro-step began
                micro["n"], micro["params"] = micro["n"] + 1, set()
            micro["params"].add(p)
            if micro["n"] % k == k - 1:
                return
            return apply(self, p, g, w, ctx)

        GradientBuffer.apply = _apply
    model = tiny_llama()
    cfg = dict(DS_CONFIG, **({dtype: {"enabled": True}} if dtype else {}))
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    cls = AdaLomo if rule == "adalomo" else LOMO
    opt = cls(engine, accumulate=True, fp16=fp16, **opts)
    params = list(engine.module.parameters())

    def snapshot():
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    log = []
    for step in range(steps):
        n_global = global_tokens(step, world, k)
        calls = [0]

        def closure(m):
            ids, mask, labels = micro_batch(step, rank, m)
            calls[0] += 1
            # the trainer's loss: this micro-batch's token sum over every rank's and micro-step's tokens, times the
            # world size (LOMO averages over ranks, as DDP does)
            loss = token_loss_sum(engine.module, ids, mask, labels).float() / n_global * world
            if poison == (step, m) and rank == 0:
                loss = loss * 1e8  # its fp16 gradient overflows on rank 0 only
            return loss

        before = snapshot()
        for m in range(k - 1):
            opt.accumulate(lambda: closure(m))
        opt.step(lambda: closure(k - 1))
        after = snapshot()
        buffers_zero = all(not b.any() for b in opt._buffer.buffers.values())
        log.append(dict(skipped=opt.last_step_skipped, unchanged=all(torch.equal(before[n], after[n]) for n in before),
                        scale=opt.loss_scale, norm=opt.grad_norm, calls=calls[0], buffers_zero=buffers_zero,
                        micro_steps=opt.micro_steps))
        assert all(p.grad is None for p in params), "a gradient outlived its hook"
    return {n: p.double() for n, p in snapshot().items()}, log


def check(world, rule, opts, steps=2, rtol=2e-5, **kw):
    params, log = run_ranks(train, world, rule, opts, steps, **kw)[0]
    model = tiny_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference(model, steps, world, rule, opts["lr"], opts.get("weight_decay", 0.0), opts.get("clip_grad_norm"))
    for name, expected in ref.items():
        moved = (expected - init[name]).abs().max().item()
        err = (params[name] - expected).abs().max().item()
        assert moved > 1e-5, f"{name} hardly moved ({moved:.1e}): the test could not see a wrong update"
        assert err <= rtol * moved + 1e-7, f"{name}: off by {err:.2e} (moved {moved:.2e})"
    return log


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2, 3])
def test_k_micro_steps_equal_one_big_batch_sgd(world):
    log = check(world, "sgd", dict(lr=0.5, weight_decay=0.1))
    assert all(e["calls"] == K and e["buffers_zero"] and e["micro_steps"] == K for e in log), log


@pytest.mark.multirank
def test_global_clipping_from_the_buffer_needs_one_backward_per_micro_step():
    log = check(2, "sgd", dict(lr=0.5, clip_grad_norm=0.3))
    assert all(e["calls"] == K for e in log), "the norm must come from the buffer, not a second backward"
    assert all(e["norm"] > 0.3 for e in log), "the clip threshold must bind for this test to mean anything"


@pytest.mark.multirank
def test_buffered_clipping_at_one_accumulation_step():
    # one micro-step per step: the buffer only buys one backward instead of two for global clipping
    params, log = run_ranks(train, 2, "sgd", dict(lr=0.5, clip_grad_norm=0.3), 2, 1)[0]
    assert all(e["calls"] == 1 and e["norm"] > 0.3 for e in log), log
    model = tiny_llama()
    ref = reference(model, 2, 2, "sgd", 0.5, clip_grad_norm=0.3, k=1)
    for name, expected in ref.items():
        assert (params[name] - expected).abs().max().item() <= 2e-6 * (1 + expected.abs().max().item()), name


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 3])
def test_adalomo_from_the_buffer_with_clipping(world):
    log = check(world, "adalomo", dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.3))
    assert all(e["calls"] == K for e in log)


@pytest.mark.multirank
def test_fp16_overflow_in_one_micro_step_skips_the_whole_step_and_clears_the_buffer():
    # step 1's middle micro-step overflows on rank 0 only; hysteresis 1 halves the scale per overflow
    fp16 = {"initial_scale_power": 12, "hysteresis": 1, "loss_scale_window": 100}
    opts = dict(lr=0.5)
    poisoned, log = run_ranks(train, 2, "sgd", opts, 3, dtype="fp16", fp16=fp16, poison=(1, 1))[0]
    assert [e["skipped"] for e in log] == [False, True, False], log
    assert log[1]["unchanged"] and not log[0]["unchanged"] and not log[2]["unchanged"]
    assert [e["scale"] for e in log] == [2.0 ** 12, 2.0 ** 11, 2.0 ** 11]
    assert all(e["buffers_zero"] for e in log), "the buffer must be cleared after a skip as after an update"
    # the same run without step 1 (and the scale it left): bit for bit, so nothing of step 1 was kept
    clean = run_ranks(train_skipping, 2, opts, fp16)[0]
    for name, value in clean.items():
        assert torch.equal(poisoned[name], value), f"{name}: the skipped step left a trace"
    # and both follow the float64 reference of steps 0 and 2, to fp16 precision
    model = tiny_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference(model.half().double(), 3, 2, "sgd", 0.5, skip=(1,))
    for name, expected in ref.items():
        moved = (expected - init[name]).abs().max().item()
        assert (poisoned[name] - expected).abs().max().item() < 0.05 * moved + 2e-3, name


def train_skipping(rank, world, opts, fp16):
    """Steps 0 and 2 of ``train``'s fp16 run, with the scale lowered in between as the skip lowers it."""
    allow_cpu_fp16()
    engine, *_ = deepspeed.initialize(model=tiny_llama(), config=dict(DS_CONFIG, fp16={"enabled": True}))
    opt = LOMO(engine, accumulate=True, fp16=fp16, **opts)
    for step in (0, 2):
        n_global = global_tokens(step, world)

        def closure(m):
            ids, mask, labels = micro_batch(step, rank, m)
            return token_loss_sum(engine.module, ids, mask, labels).float() / n_global * world

        for m in range(K - 1):
            opt.accumulate(lambda: closure(m))
        opt.step(lambda: closure(K - 1))
        if step == 0:
            opt.loss_scaler.update(True)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


# ---------------------------------------------------------------- mutations the tests above must see
@pytest.mark.multirank
@pytest.mark.parametrize("sabotage", ["keep_buffer", "drop_last_add"])
def test_mutations_are_seen(sabotage):
    with pytest.raises(AssertionError, match="off by"):
        check(2, "sgd", dict(lr=0.5, weight_decay=0.1), sabotage=sabotage)


def test_accumulate_needs_a_buffer_and_buffer_dtype_is_checked():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="accumulate=True"):
        LOMO(model).accumulate(lambda: model(torch.ones(1, 2)).sum())
    with pytest.raises(ValueError, match="buffer_dtype"):
        LOMO(model, accumulate=True, buffer_dtype=torch.int8)


def test_plain_module_bf16_buffer_halves_it_and_tracks_fp32():
    """One process, no DeepSpeed: the buffer is whole-tensor sized; a bf16 buffer holds bf16 sums."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    ref = copy.deepcopy(model)
    loss = sum(ref(x[i:i + 2]).pow(2).sum() for i in range(0, 6, 2))
    loss.backward()
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        live = copy.deepcopy(model).float()
        opt = LOMO(live, lr=0.1, accumulate=True, buffer_dtype=dtype)
        for i in (0, 2):
            opt.accumulate(lambda: live(x[i:i + 2].float()).pow(2).sum())
        opt.step(lambda: live(x[4:6].float()).pow(2).sum())
        assert {b.dtype for b in opt._buffer.buffers.values()} == {dtype}
        runs[dtype] = {n: p.double() for n, p in live.named_parameters()}
    for name, p in ref.named_parameters():
        expected = dict(model.named_parameters())[name] - 0.1 * p.grad
        assert (runs[torch.float32][name] - expected).abs().max() < 1e-5, name
        assert (runs[torch.bfloat16][name] - expected).abs().max() < 2e-2 * p.grad.abs().max(), name
