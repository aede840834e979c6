"""Independent float64 references for every update rule the engine offers, sharing no code with lomo_trainer.

Written from the definitions: plain autograd on a float64 copy of the model, the gradients clipped one way
(``clipped``), then each parameter stepped by its rule (``sgd``, ``adalomo``, ``adamw``, ``normalized_sgd``). ``train`` drives them;
the test modules only say which loss, which rule for which parameter, and how to clip.
"""
from __future__ import annotations

import copy

import torch


def clipped(grads, max_norm: float | None = None, per_param: bool = False, max_value: float | None = None):
    """The gradients as clipping is defined: the global coefficient min(1, max_norm / ||all grads||) from the
    unclamped gradients; each gradient clamped to [-max_value, max_value], times the global coefficient, or
    clipped to max_norm on its own (per_param)."""
    coef = 1.0
    if max_norm is not None and not per_param:
        coef = min(1.0, max_norm / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
    out = []
    for g in grads:
        if max_value is not None:
            g = g.clamp(-max_value, max_value)
        g = g * coef
        if max_norm is not None and per_param:
            g = g * min(1.0, max_norm / (g.norm().item() + 1e-6))
        out.append(g)
    return out


def sgd(lr: float, weight_decay: float = 0.0):
    """SGD with decoupled weight decay: p <- p (1 - lr wd) - lr g."""
    def step(p, g, state, t):
        p.mul_(1 - lr * weight_decay).sub_(lr * g)
    return step


def adalomo(lr: float, weight_decay: float = 0.0, clip_threshold: float = 1.0, decay_rate: float = -0.8,
            eps=(1e-30, 1e-3)):
    """AdaLomo (arXiv 2310.10195, Algorithm 1): row and column sums of G^2 over the last two dimensions (a batch
    of matrices), V = r c^T / sum(r); grouped update normalisation; lr scaled by the parameter's RMS."""
    def step(p, g, state, t):
        beta2 = 1 - t ** decay_rate
        sq = g ** 2 + eps[0]
        if p.dim() >= 2:
            m = sq.reshape(-1, *p.shape[-2:])
            state["r"] = beta2 * state.get("r", 0) + (1 - beta2) * m.sum(-1)  # row sums, (B, R)
            state["c"] = beta2 * state.get("c", 0) + (1 - beta2) * m.sum(-2)  # column sums, (B, C)
            v = (state["r"][:, :, None] * state["c"][:, None, :] / state["r"].sum(-1)[:, None, None]).reshape(p.shape)
        else:
            v = state["v"] = beta2 * state.get("v", 0) + (1 - beta2) * sq
        u = g / v.sqrt()
        u = u / max(1.0, (u.pow(2).mean().sqrt() / clip_threshold).item())
        lr_t = lr * max(eps[1], p.pow(2).mean().sqrt().item())
        p.mul_(1 - lr_t * weight_decay).sub_(lr_t * u)
    return step


def adamw(lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """AdamW (Loshchilov & Hutter) with bias correction, decoupled decay lr * wd."""
    b1, b2 = betas

    def step(p, g, state, t):
        state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
        state["v"] = b2 * state.get("v", 0) + (1 - b2) * g * g
        p.mul_(1 - lr * weight_decay)
        p.sub_(lr * (state["m"] / (1 - b1 ** t)) / ((state["v"] / (1 - b2 ** t)).sqrt() + eps))
    return step


def normalized_sgd(lr: float):
    """p <- p - lr g / ||g||, each parameter on its own: the example rule of tests/test_rules.py."""
    def step(p, g, state, t):
        p.sub_(lr * g / (g.norm() + 1e-12))
    return step


def train(model, steps: int, loss_of, rule=None, rule_of=None, keep=lambda name: True, skip=(),
          **clip) -> dict[str, torch.Tensor]:
    """float64 training of a copy of ``model``: at each step not in ``skip``, the gradient of ``loss_of(model,
    step)`` with respect to the parameters ``keep`` names, clipped (``clipped``'s keywords), then ``rule`` (or
    ``rule_of(name)``, per parameter) steps each one; t counts the steps taken. Returns every parameter by name."""
    model = copy.deepcopy(model).double()
    rule_of = rule_of or (lambda name: rule)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if keep(n)])
    state = {n: {} for n in names}
    t = 0
    for step in range(steps):
        if step in skip:
            continue
        t += 1
        grads = torch.autograd.grad(loss_of(model, step), params)
        with torch.no_grad():
            for n, p, g in zip(names, params, clipped(grads, **clip)):
                rule_of(n)(p, g, state[n], t)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close(result, ref, init, rtol=2e-5):
    """Every parameter of ``result`` within ``rtol`` of how far the reference moved it from ``init`` (plus fp32's
    rounding), and each one moved enough for a wrong update to show."""
    assert set(result) == set(ref)
    for name, expected in ref.items():
        moved = (expected - init[name]).abs().max().item()
        err = (result[name] - expected).abs().max().item()
        assert moved > 1e-5, f"{name} hardly moved ({moved:.1e}): the test could not see a wrong update"
        assert err <= rtol * moved + 1e-7, f"{name}: off by {err:.2e} (moved {moved:.2e})"


def assert_weights_match(result, ref, init, tol=2e-6):
    """Every parameter within ``tol`` x (1 + its largest magnitude) of the reference, and each one moved from ``init``
    by more than 1e-4, so that a wrong update could show."""
    assert set(result) == set(ref)
    for name, expected in ref.items():
        moved = (expected - init[name]).abs().max().item()
        err = (result[name] - expected).abs().max().item()
        assert moved > 1e-4, f"{name} hardly moved ({moved:.1e}): the test could not see a wrong update"
        assert err <= tol * (1 + expected.abs().max().item()), f"{name}: off by {err:.2e} (moved {moved:.2e})"


def rank_mean_loss(world: int, batch_of):
    """The loss DDP and LOMO average: the mean over ranks of each rank's loss on ``batch_of(step, rank)``."""
    def loss(model, step):
        return sum(model(input_ids=b, labels=b).loss for b in (batch_of(step, r) for r in range(world))) / world
    return loss

