"""LOMO on a plain module (one process, or several with gradients averaged), its API contract, and precision."""
import pytest
import torch
from torch import nn

from distributed import run_ranks
from lomo_trainer import LOMO, DynamicLossScaler
from lomo_trainer.rounding import stochastic_round_to_bf16_
from models import OddLM, batch, fp16_mlp, reference_sgd

OPTS = dict(lr=0.5, weight_decay=0.02, clip_grad_norm=0.3, clip_grad_value=0.05)


def train_plain(rank, world, opts, steps=3):
    model = OddLM(checkpointing=True)
    opt = LOMO(model, **opts)
    n_params = len(list(model.parameters()))
    for step in range(steps):
        b = batch(step, rank, 97)
        opt.step(lambda: model(input_ids=b, labels=b).loss)
        assert all(p.grad is None for p in model.parameters())
        assert opt.hook_calls == n_params
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def assert_close_to_reference(params, world, opts, steps=3):
    ref = reference_sgd(OddLM(checkpointing=True), steps, world, 97, lr=opts["lr"], weight_decay=opts["weight_decay"],
                        clip_grad_norm=opts["clip_grad_norm"], clip_grad_value=opts["clip_grad_value"])
    for name, expected in ref.items():
        assert (params[name] - expected).abs().max().item() <= 2e-6 * (1 + expected.abs().max().item()), name


def test_plain_one_process_matches_sgd():
    assert_close_to_reference(train_plain(0, 1, OPTS), 1, OPTS)


@pytest.mark.multirank
@pytest.mark.parametrize("overlap", [True, False])
def test_plain_two_ranks_average_gradients(overlap):
    results = run_ranks(train_plain, 2, dict(OPTS, overlap_comm=overlap))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), f"replicas drifted apart at {name}"
    assert_close_to_reference(results[0], 2, OPTS)


def test_lr_is_read_from_param_groups_each_step():
    model = nn.Linear(3, 1, bias=False)
    opt = LOMO(model, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # sets lr = 0.5
    x = torch.ones(1, 3)
    before = model.weight.detach().clone()
    opt.step(lambda: model(x).sum())
    sched.step()
    assert torch.allclose(model.weight, before - 0.5 * x)  # d(sum(Wx))/dW = x
    opt.param_groups[0]["lr"] = 0.0
    after_one = model.weight.detach().clone()
    opt.step(lambda: model(x).sum())
    assert torch.equal(model.weight, after_one)


def test_state_dict_round_trip_restores_lr_step_and_scaler():
    model = nn.Linear(3, 1, bias=False)
    opt = LOMO(model, lr=0.1, fp16={"initial_scale_power": 3, "loss_scale_window": 1})
    opt.step(lambda: model(torch.ones(1, 3)).sum())
    opt.param_groups[0]["lr"] = 0.25
    state = opt.state_dict()
    fresh_model = nn.Linear(3, 1, bias=False)
    fresh_model.load_state_dict(model.state_dict())
    fresh = LOMO(fresh_model, lr=0.0, fp16={"initial_scale_power": 3, "loss_scale_window": 1})
    fresh.load_state_dict(state)
    assert fresh.global_step == 1 and fresh.loss_scale == opt.loss_scale == 8.0
    assert fresh.loss_scaler.clean_steps == opt.loss_scaler.clean_steps == 1
    before = fresh_model.weight.detach().clone()
    fresh.step(lambda: fresh_model(torch.ones(1, 3)).sum())
    assert torch.allclose(fresh_model.weight, before - 0.25), "the loaded lr must drive the update"


def test_closure_must_not_call_backward_and_step_needs_closure():
    model = nn.Linear(3, 1)
    opt = LOMO(model, lr=0.1)
    with pytest.raises(RuntimeError, match="must not call backward"):
        def bad():
            loss = model(torch.ones(1, 3)).sum()
            loss.backward()
            return loss
        opt.step(bad)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_backward_outside_step_leaves_gradients_alone():
    model = nn.Linear(3, 1)
    LOMO(model, lr=0.1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None and torch.equal(model.weight, before)


# ---------------------------------------------------------------- fp16 loss scaling
def test_fp16_overflow_changes_nothing_and_lowers_scale():
    model = fp16_mlp()
    opt = LOMO(model, lr=0.1, fp16={"initial_scale_power": 10, "hysteresis": 1, "loss_scale_window": 1000})
    x = torch.randn(4, 8).half()
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(lambda: model(x).float().sum() * 1e4)  # x 2^10 overflows fp16 gradients
    assert opt.last_step_skipped and opt.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "an overflowing step moved a weight"
    assert opt.loss_scale == 2.0 ** 9
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(loss)


def test_fp16_hysteresis_delays_the_drop():
    model = fp16_mlp()
    opt = LOMO(model, lr=0.1, fp16={"initial_scale_power": 10, "hysteresis": 2})
    x = torch.randn(4, 8).half()
    opt.step(lambda: model(x).float().sum() * 1e4)
    assert opt.last_step_skipped and opt.loss_scale == 2.0 ** 10
    opt.step(lambda: model(x).float().sum() * 1e4)
    assert opt.loss_scale == 2.0 ** 9


def test_fp16_scale_grows_after_clean_window_and_update_is_unscaled():
    model = fp16_mlp()
    ref = [p.detach().double().clone().requires_grad_() for p in model.parameters()]
    opt = LOMO(model, lr=0.1, fp16={"initial_scale_power": 4, "loss_scale_window": 3})
    x = torch.randn(4, 8).half()
    scales = []
    for _ in range(4):
        opt.step(lambda: model(x).float().sum())
        scales.append(opt.loss_scale)
    assert scales == [16, 16, 16, 32]  # DeepSpeed: the first growth on the (window + 1)-th clean step
    # first step only, against float64 math (fp16 tolerance): the loss scale must be divided out exactly once
    model2 = fp16_mlp()
    LOMO(model2, lr=0.1, fp16={"initial_scale_power": 4}).step(lambda: model2(x).float().sum())
    w1, b1, w2, b2 = ref
    out = (torch.tanh(x.double() @ w1.t() + b1) @ w2.t() + b2).sum()
    grads = torch.autograd.grad(out, ref)
    for p, r, g in zip(model2.parameters(), ref, grads):
        torch.testing.assert_close(p.double(), r.detach() - 0.1 * g, atol=2e-3, rtol=2e-3)


def test_loss_scaler_state_round_trip():
    s = DynamicLossScaler(initial_scale_power=5, loss_scale_window=2, hysteresis=1)
    s.update(True), s.update(False)
    t = DynamicLossScaler(initial_scale_power=5, loss_scale_window=2, hysteresis=1)
    t.load_state_dict(s.state_dict())
    for _ in range(3):  # the restored clean-step count decides when the scale grows
        s.update(False), t.update(False)
        assert s.scale == t.scale
    assert s.scale == 32.0  # 32 -> 16 on the overflow, grown back on the third clean step


# ---------------------------------------------------------------- bf16 stochastic rounding
def test_stochastic_rounding_is_unbiased():
    base = torch.full((200_000,), 1.0)
    ulp = 2.0 ** -7  # bf16 spacing just above 1.0
    x = base + 0.3 * ulp
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, x, torch.Generator().manual_seed(0))
    vals = out.float()
    assert set(vals.unique().tolist()) == {1.0, 1.0 + ulp}
    assert vals.mean().item() == pytest.approx(1.0 + 0.3 * ulp, abs=0.01 * ulp)
    neg = torch.empty_like(out)
    stochastic_round_to_bf16_(neg, -x, torch.Generator().manual_seed(1))
    assert neg.float().mean().item() == pytest.approx(-(1.0 + 0.3 * ulp), abs=0.01 * ulp)


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_small_updates_track_fp32(stochastic):
    lr, steps = 1e-3, 300
    grad = torch.linspace(0.1, 1.0, 256)  # updates of 1e-4..1e-3 against a bf16 ulp of 7.8e-3 at 1.0
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    opt = LOMO(model, lr=lr, stochastic_rounding=stochastic, seed=3)
    for _ in range(steps):
        opt.step(lambda: (model.w.float() * grad).sum())
    expected = 1.0 - lr * steps * grad  # the fp32 trajectory: 0.97 .. 0.7
    err = model.w.float() - expected
    if stochastic:
        # each step adds independent zero-mean rounding noise: the bias (mean error over the 256 weights)
        # stays near 0 and the spread is a random walk of ~sqrt(steps)/2 ulps, far below the 0.165 drift
        # of round-to-nearest
        assert abs(err.mean().item()) < 0.006, f"stochastic rounding is biased by {err.mean().item():.4f}"
        assert err.abs().mean().item() < 0.04
    else:
        assert torch.equal(model.w.float(), torch.ones(256)), "round-to-nearest should stall on sub-ulp updates"
