"""LOMO + LoRA (issue 11): LOMO's SGD on the base weights in the hooks, AdamW on peft's LoRA adapters after the same
backward, on a plain module and on DeepSpeed ZeRO-3 (CPU, gloo, DeepSpeed's default persistence threshold),
against a float64 reference written here: SGD on the base and AdamW (from Loshchilov & Hutter's algorithm) on the
adapters, clipped by the global norm over both sets."""
import copy

import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.adalomo import AdaLomo
from lomo_trainer.config import ConfigError
from lomo_trainer.lora import adapter_parameters, check_block, prepare_model
from models import VOCAB, batch, tiny_llama

pytest.importorskip("peft")

STEPS = 3
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
# init_lora_weights false: B starts random too, so both adapter matrices move from the first step
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False}
ADAMW = {"type": "AdamW", "params": {"lr": 2e-2, "betas": [0.8, 0.9], "eps": 1e-3, "weight_decay": 0.1}}


def peft_llama():
    torch.manual_seed(0)
    return prepare_model(tiny_llama(tie=True), check_block({**LORA, "optimizer": ADAMW}))


def reference(model, steps, world, lr, weight_decay=0.0, clip_grad_norm=None, adamw=ADAMW["params"]):
    """float64: SGD on the base weights, AdamW on the adapters, one global norm over both."""
    model = copy.deepcopy(model).double()
    names, params = zip(*model.named_parameters())
    b1, b2 = adamw["betas"]
    m = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    v = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for step in range(steps):
        loss = sum(model(input_ids=b, labels=b).loss for b in (batch(step, r, VOCAB) for r in range(world))) / world
        grads = torch.autograd.grad(loss, params)
        coef = 1.0
        if clip_grad_norm is not None:
            coef = min(1.0, clip_grad_norm / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        t = step + 1
        with torch.no_grad():
            for n, p, g in zip(names, params, grads):
                g = g * coef
                if "lora_" not in n:
                    p.mul_(1 - lr * weight_decay).sub_(lr * g)
                    continue
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                p.mul_(1 - adamw["lr"] * adamw["weight_decay"])
                p.sub_(adamw["lr"] * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + adamw["eps"]))
    return {n: p.detach().clone() for n, p in zip(names, params)}


def assert_close(result, ref, init, rtol=2e-5):
    assert set(result) == set(ref)
    assert any("lora_A" in n for n in ref) and any("base_layer" in n for n in ref)
    for name, expected in ref.items():
        moved = (expected - init[name]).abs().max().item()
        err = (result[name] - expected).abs().max().item()
        assert moved > 1e-5, f"{name} hardly moved ({moved:.1e}): the test could not see a wrong update"
        ulp = 1.2e-7 * max(1.0, expected.abs().max().item())  # fp32 rounding of a weight near 1 (norms)
        assert err <= rtol * moved + 2 * ulp, f"{name}: off by {err:.2e} (moved {moved:.2e})"


def train_zero3(rank, world, opts, steps=STEPS, cls=LOMO):
    model = peft_llama()
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    opt = cls(engine, adapters=adapter_parameters(model), adapter_optimizer=ADAMW, **opts)
    for step in range(steps):
        b = batch(step, rank, VOCAB)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        assert all(p.grad is None for p in engine.module.parameters()), "a gradient outlived its step"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def check_zero3(world, opts):
    params = run_ranks(train_zero3, world, opts)[0]
    model = peft_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    assert_close(params, reference(model, STEPS, world, **opts), init)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero3_lomo_lora_matches_reference_with_global_clipping(world):
    # clip 0.5 binds (the global norm is ~2-3): the coefficient must cover base and adapter gradients alike
    check_zero3(world, dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.5))


def test_zero3_lomo_lora_without_clipping_one_pass():
    check_zero3(2, dict(lr=0.05))


def test_plain_module_matches_reference():
    model = peft_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    opt = LOMO(model, lr=0.3, clip_grad_norm=0.5, adapters=adapter_parameters(model), adapter_optimizer=ADAMW)
    for step in range(STEPS):
        b = batch(step, 0, VOCAB)
        opt.step(lambda: model(input_ids=b, labels=b).loss)
    result = {n: p.detach().double() for n, p in model.named_parameters()}
    assert_close(result, reference(peft_llama(), STEPS, 1, lr=0.3, clip_grad_norm=0.5), init)


def test_mutation_adapters_stepped_by_sgd_fail():
    """The reference must see it when the adapters get LOMO's SGD instead of AdamW."""
    model = peft_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    sgd = {"type": "SGD", "params": {"lr": 2e-2}}
    opt = LOMO(model, lr=0.05, adapters=adapter_parameters(model), adapter_optimizer=sgd)
    for step in range(STEPS):
        b = batch(step, 0, VOCAB)
        opt.step(lambda: model(input_ids=b, labels=b).loss)
    result = {n: p.detach().double() for n, p in model.named_parameters()}
    with pytest.raises(AssertionError, match="off by"):
        assert_close(result, reference(peft_llama(), STEPS, 1, lr=0.05), init)


def test_block_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"lora has unknown key\(s\) \['rank'\]"):
        check_block({"rank": 8})
    with pytest.raises(ConfigError, match="lora.use_dora is not supported"):
        check_block({"r": 8, "use_dora": True})
    with pytest.raises(ConfigError, match=r"lora.optimizer.type 'LBFGS'"):
        check_block({"r": 8, "optimizer": {"type": "LBFGS"}})
    with pytest.raises(ConfigError, match=r"lora.optimizer.params: Invalid beta"):
        check_block({"r": 8, "optimizer": {"type": "AdamW", "params": {"betas": [1.5, 0.9]}}})
