"""Non-finite values never reach the weights, in any precision, and every skip is counted (issues 9 and 15)."""
import pytest
import math

import deepspeed
import torch
from torch import nn

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.optim import all_finite
from models import VOCAB, allow_cpu_fp16, batch, fp16_mlp, reference_sgd, tiny_llama


def test_all_finite_agrees_with_isfinite_all_on_every_kind_of_value():
    # the update's guard: a single read (aminmax), checked against torch's element-wise definition
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        for special in (None, math.nan, math.inf, -math.inf, big, -big):
            for pos in (0, 517, 4095):
                t = torch.randn(4096).to(dtype)
                if special is not None:
                    t[pos] = special
                assert bool(all_finite(t)) == bool(torch.isfinite(t).all()), (dtype, special, pos)
        assert bool(all_finite(torch.empty(0, dtype=dtype)))
        both = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
        assert not all_finite(both) and not all_finite(both[:2]) and not all_finite(both[2:])


def test_fp16_update_pass_overflow_writes_nothing_non_finite_and_lowers_the_scale():
    # The norm pass is clean; the update pass gets one huge gradient (as a GPU's second pass can, at the
    # overflow edge). That parameter must keep its value; the next step's sync counts it and halves the scale.
    model = fp16_mlp()
    opt = LOMO(model, lr=0.1, fp16={"initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 1000})
    x = torch.randn(4, 8).half()
    calls = []

    def closure():
        calls.append(1)
        loss = model(x).float().sum()
        if len(calls) == 2:  # step 1, update pass
            loss = loss + 1e30 * model[2].bias.float().sum()
        return loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the update pass wrote a non-finite value"
    assert torch.equal(model[2].bias, before["2.bias"]), "the overflowing parameter moved"
    assert not torch.equal(model[0].weight, before["0.weight"]), "the finite parameters must still be updated"
    assert opt.loss_scale == 2.0 ** 8  # not known yet: read at the next step's sync, without a sync of its own
    opt.step(closure)
    assert opt.skipped_steps == 1 and opt.update_overflows == 1 and opt.loss_scaler.overflows == 1
    assert opt.loss_scale == 2.0 ** 7 and not opt.last_step_skipped


def test_one_pass_non_finite_loss_skips_before_backward_without_a_scaler():
    model = nn.Linear(3, 1)
    opt = LOMO(model, lr=0.1)  # no global clipping, no fp16: one pass, the backward is the update
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(lambda: model(torch.ones(1, 3)).sum() * float("nan"))
    assert math.isnan(loss.item())
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.global_step == 0
    assert opt.hook_calls == 0, "a non-finite loss reached backward"
    assert opt.loss_scaler is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.step(lambda: model(torch.ones(1, 3)).sum())
    assert not opt.last_step_skipped and opt.global_step == 1 and opt.skipped_steps == 1


def test_norm_pass_non_finite_loss_skips_in_bf16():
    model = nn.Linear(3, 1).to(torch.bfloat16)
    opt = LOMO(model, lr=0.1, clip_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(torch.ones(1, 3, dtype=torch.bfloat16)).float().sum() * float("inf"))
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.grad_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kind", ["one_pass", "norm_pass", "fp16", "buffered", "adalomo_buffered"])
@pytest.mark.parametrize("last_loss", ["0/0", "finite"])
def test_an_empty_step_changes_nothing_is_not_counted_and_discards_its_buffer(kind, last_loss):
    """``step(closure, empty=flag)``: decided at the step's one sync; weights, rule state and fp16 scale stay, the
    buffer of its micro-steps is dropped, nothing is counted, and the next step is the one it would have been."""
    from host_reads import HostReads
    from lomo_trainer.optim import AdaLomo

    fp16 = kind == "fp16"
    buffered = kind.endswith("buffered")
    opts = dict(lr=0.1, clip_grad_norm=1.0 if kind == "norm_pass" else None, accumulate=buffered,
                fp16={"initial_scale_power": 8, "hysteresis": 1} if fp16 else None)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def make():
        model = fp16_mlp() if fp16 else fp16_mlp().float()
        return model, (AdaLomo if kind.startswith("adalomo") else LOMO)(model, **opts)

    def loss_of(model, i):
        return model(x.to(model[0].weight.dtype) * (i + 1)).float().pow(2).mean()

    def take_step(model, opt, i, empty=None, last=None):
        if buffered:
            opt.accumulate(lambda: loss_of(model, i))  # a finite gradient: left in the buffer, it would show
        return opt.step(last or (lambda: loss_of(model, i)), empty=empty)

    model, opt = make()
    twin, twin_opt = make()
    take_step(model, opt, 0)
    take_step(twin, twin_opt, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = [(k, v.clone()) for s in opt.state.values() for k, v in s.items()]
    if last_loss == "0/0":  # a token mean over no token: NaN, whose backward would be NaN gradients
        last = lambda: loss_of(model, 1).sum() * 0 / torch.zeros(())  # noqa: E731
    else:
        last = lambda: loss_of(model, 1)  # noqa: E731
    with HostReads() as reads:
        loss = take_step(model, opt, 1, empty=torch.tensor(True), last=last)
    assert reads.count == 1, reads.where  # the step's one sync, the flag in it
    assert math.isnan(loss.item()) == (last_loss == "0/0")
    assert opt.last_step_skipped and opt.last_step_empty
    assert opt.skipped_steps == 0 and opt.global_step == 1 and opt.loss_scale == twin_opt.loss_scale
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "an empty step updated"
    assert [k for k, _ in state] == [k for s in opt.state.values() for k in s]
    assert all(torch.equal(v, was) for (_, was), v in zip(state, [v for s in opt.state.values() for v in s.values()]))
    assert bool(state) == kind.startswith("adalomo")
    if buffered:
        assert not opt._buffer.touched and all(not b.any() for b in opt._buffer.buffers.values())
    for i in (2, 3):  # the next steps: as if the empty one never was (a stale buffer or scale would show)
        take_step(model, opt, i, empty=torch.tensor(False))
        take_step(twin, twin_opt, i)
        assert not opt.last_step_skipped and not opt.last_step_empty
    assert opt.global_step == twin_opt.global_step == 3 and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_skipped_steps_survive_state_dict():
    model = nn.Linear(3, 1)
    opt = LOMO(model, lr=0.1)
    opt.step(lambda: model(torch.ones(1, 3)).sum() * float("nan"))
    fresh = LOMO(nn.Linear(3, 1), lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


# ---------------------------------------------------------------- ZeRO-3, 2 ranks
def train_nan_on_one_rank(rank, world, nan_step):
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 2,
                                                           "zero_optimization": {"stage": 3}})
    opt = LOMO(engine, lr=0.5)
    log = []
    for step in range(3):
        b = batch(step, rank, VOCAB)

        def closure():
            loss = engine.module(input_ids=b, labels=b).loss
            return loss * float("nan") if (step == nan_step and rank == 1) else loss

        opt.step(closure)
        log.append((opt.last_step_skipped, opt.hook_calls))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    return params, log, opt.skipped_steps


@pytest.mark.multirank
def test_zero3_nan_loss_on_one_rank_skips_the_step_on_every_rank():
    results = run_ranks(train_nan_on_one_rank, 2, 1)
    for params, log, skipped in results:
        assert [s for s, _ in log] == [False, True, False] and skipped == 1
        assert log[1][1] == 0, "the skipped step ran a backward"
    ref = reference_sgd(tiny_llama(), 2, 2, VOCAB, lr=0.5, batches=[[batch(s, r, VOCAB) for r in range(2)] for s in (0, 2)])
    for name, expected in ref.items():
        err = (results[0][0][name] - expected).abs().max().item()
        assert err <= 2e-6 * (1 + expected.abs().max().item()), f"{name}: off by {err:.2e}"


def empty_on_one_rank(rank, world):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = LOMO(model, lr=0.1, accumulate=True)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.full((1, 3), float(rank + 1))
    opt.accumulate(lambda: model(x).sum())
    opt.step(lambda: model(x).sum(), empty=torch.tensor(rank == 1))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return opt.last_step_empty, opt.skipped_steps, unchanged, not opt._buffer.touched


@pytest.mark.multirank
def test_a_step_empty_on_one_rank_is_empty_on_every_rank():
    assert run_ranks(empty_on_one_rank, 2) == [(True, 0, True, True)] * 2


def train_fp16_sum_overflow(rank, world):
    allow_cpu_fp16()
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True},
                                                           "zero_optimization": {"stage": 3}})
    # every rank's gradient is 1 per weight: x 2^15 it is 32768, fp16-finite, but the sum over 2 ranks is 65536 = inf
    opt = LOMO(engine, lr=0.25, fp16={"initial_scale_power": 15, "hysteresis": 1})
    x = torch.ones(1, 4, dtype=torch.float16)
    opt.step(lambda: engine.module(x).float().sum())
    with deepspeed.zero.GatheredParameters([engine.module.weight]):
        return opt.last_step_skipped, engine.module.weight.detach().float().clone()


@pytest.mark.multirank
def test_zero3_fp16_gradients_are_divided_by_world_before_the_sum():
    for skipped, weight in run_ranks(train_fp16_sum_overflow, 2):
        assert not skipped, "the summed scaled gradients overflowed: divide by world before reducing"
        assert torch.equal(weight, torch.full((1, 4), 0.75))  # 1 - lr * mean gradient (1)


def train_update_overflow_on_one_rank(rank, world):
    allow_cpu_fp16()
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True},
                                                           "zero_optimization": {"stage": 3}})
    opt = LOMO(engine, lr=0.5, fp16={"initial_scale_power": 10, "hysteresis": 1})
    norm_weight = engine.module.model.norm.weight
    calls, log = [0], []
    for step in range(3):
        b = batch(step, rank, VOCAB)

        def closure():
            calls[0] += 1
            loss = engine.module(input_ids=b, labels=b).loss
            if calls[0] == 2 and rank == 1:  # step 0's update pass, one rank: one huge gradient
                loss = loss + 1e30 * norm_weight.float().sum()
            return loss

        opt.step(closure)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            finite = all(torch.isfinite(p).all().item() for p in engine.module.parameters())
        log.append((finite, opt.skipped_steps, opt.loss_scale))
    return log


@pytest.mark.multirank
def test_zero3_fp16_update_pass_overflow_is_counted_on_every_rank():
    logs = run_ranks(train_update_overflow_on_one_rank, 2)
    assert logs[0] == logs[1], "ranks disagree"
    assert all(finite for finite, _, _ in logs[0]), "the update pass wrote a non-finite value"
    assert [(s, scale) for _, s, scale in logs[0]] == [(0, 2.0 ** 10), (1, 2.0 ** 9), (1, 2.0 ** 9)], logs[0]
