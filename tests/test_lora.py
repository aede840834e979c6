"""LOMO + LoRA (issue 11): LOMO's SGD on the base weights in the hooks, AdamW on peft's LoRA adapters after the same
backward, on a plain module and on DeepSpeed ZeRO-3 (CPU, gloo, DeepSpeed's default persistence threshold),
against a float64 reference written here: SGD on the base and AdamW (from Loshchilov & Hutter's algorithm) on the
adapters, clipped by the global norm over both sets."""
import os

import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.optim import AdaLomo
from lomo_trainer.errors import ConfigError
from lomo_trainer.lora import adapter_parameters, prepare_model
from lomo_trainer.lora_config import check_block
import reference as reference_rules
from models import DS_CONFIG, VOCAB, batch, tiny_llama

pytest.importorskip("peft")

STEPS = 3
# init_lora_weights false: B starts random too, so both adapter matrices move from the first step
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False}
ADAMW = {"type": "AdamW", "params": {"lr": 2e-2, "betas": [0.8, 0.9], "eps": 1e-3, "weight_decay": 0.1}}


def peft_llama():
    torch.manual_seed(0)
    return prepare_model(tiny_llama(tie=True), check_block({**LORA, "optimizer": ADAMW}))


def reference(model, steps, world, lr, weight_decay=0.0, clip_grad_norm=None, adamw=ADAMW["params"]):
    """float64 (tests/reference.py): SGD on the base weights, AdamW on the adapters, one global norm over both."""
    base, adapter = reference_rules.sgd(lr, weight_decay), reference_rules.adamw(
        adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"])
    return reference_rules.train(model, steps, reference_rules.rank_mean_loss(world, lambda s, r: batch(s, r, VOCAB)),
                                 rule_of=lambda name: adapter if "lora_" in name else base, max_norm=clip_grad_norm)


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


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero3_lomo_lora_matches_reference_with_global_clipping(world):
    # clip 0.5 binds (the global norm is ~2-3): the coefficient must cover base and adapter gradients alike
    check_zero3(world, dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.5))


@pytest.mark.multirank
def test_zero3_lomo_lora_without_clipping_one_pass():
    check_zero3(2, dict(lr=0.05))


@pytest.mark.multirank
def test_zero3_adalomo_base_with_fixed_adapters_is_adalomo():
    """AdaLomo on the base: with the adapters' AdamW at lr 0 the base must follow test_adalomo's float64 reference
    (the adapter group takes no part in AdaLomo's statistics) and the adapters stay put. No norm clipping: the global
    norm would also count the adapters' gradients, which the base-only reference leaves out."""
    from models import reference_adalomo

    global ADAMW
    saved, ADAMW = ADAMW, {"type": "AdamW", "params": {"lr": 0.0}}
    try:
        params = run_ranks(train_zero3, 2, dict(lr=0.05), cls=AdaLomo)[0]
    finally:
        ADAMW = saved
    model = peft_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_adalomo(model, STEPS, 2, VOCAB, lr=0.05, keep=lambda n: "lora_" not in n)
    for name, expected in ref.items():
        if "lora_" in name:
            assert torch.equal(params[name], init[name]), name
            continue
        moved = (expected - init[name]).abs().max().item()
        err = (params[name] - expected).abs().max().item()
        assert moved > 1e-5 and err <= 2e-5 * moved + 2.4e-7 * max(1.0, expected.abs().max().item()), (name, err, moved)


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


# ---------------------------------------------------------------- LOMOTrainer, lomo-train: config, saving, resuming
def lora_trainer(out, zero3, steps=4, resume=None, **kw):
    from trainers import _args, _dataset, ds_config

    from lomo_trainer import LOMOTrainer

    args = _args(out, ds_config() if zero3 else None, max_steps=steps, learning_rate=0.05, save_strategy="steps",
                 save_steps=2, **kw)
    trainer = LOMOTrainer(model=tiny_llama(), args=args, train_dataset=_dataset(),
                          lomo_args={"lora": {**LORA, "optimizer": ADAMW}})
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapter_state(trainer):
    """This rank's adapter optimizer state: masters and AdamW moments, flattened to tensors."""
    a = trainer.optimizer.adapters
    state = a.optimizer.state
    return [t.clone() for p in a.params for t in (a.masters[p].detach(), *(state[a.masters[p]][k]
                                                                         for k in ("exp_avg", "exp_avg_sq", "step")))]


def run_lora(rank, world, out, zero3, steps, resume=None):
    from trainers import gathered_weights

    trainer = lora_trainer(out, zero3, steps, resume)
    logs = [(h["learning_rate"], h["adapter_learning_rate"]) for h in trainer.state.log_history if "loss" in h]
    return gathered_weights(trainer), adapter_state(trainer), logs


@pytest.mark.multirank
@pytest.mark.parametrize("world,zero3", [(1, False), (2, True)])
def test_trainer_resume_is_bitwise_with_adapter_optimizer_state(tmp_path, world, zero3):
    import shutil

    whole = run_ranks(run_lora, world, str(tmp_path / "whole"), zero3, 4)
    out = str(tmp_path / "cut")
    run_ranks(run_lora, world, out, zero3, 4)
    shutil.rmtree(os.path.join(out, "checkpoint-4"))  # as if killed after step 2's checkpoint
    resumed = run_ranks(run_lora, world, out, zero3, 4, True)
    for r in range(world):
        w0, s0, _ = whole[r]
        w1, s1, _ = resumed[r]
        assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1)), "adapter optimizer state differs"
        if r == 0:
            assert set(w0) == set(w1) and all(torch.equal(w0[k], w1[k]) for k in w0), "weights differ"
    logs = whole[0][2]
    # one schedule (linear, 2 warm-up steps) drives both lrs, each from its own peak
    assert all(abs(a * 0.05 - lr * ADAMW["params"]["lr"]) < 1e-12 for lr, a in logs) and logs[1][0] == 0.05, logs


def saved_folders(rank, world, out, zero3):
    trainer = lora_trainer(out, zero3, steps=2)
    trainer.save_model()
    from trainers import gathered_weights

    return gathered_weights(trainer)


@pytest.mark.multirank
@pytest.mark.parametrize("world,zero3", [(1, False), (2, True)])
def test_saved_model_is_merged_and_adapter_folder_is_peft(tmp_path, world, zero3):
    """The output folder is the plain model with peft's own merge applied; adapter/ loads with PeftModel; a
    checkpoint (unmerged base + adapter/) is the trained model exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    trained = run_ranks(saved_folders, world, out, zero3)[0]
    model = peft_llama()
    model.load_state_dict({k: v.float() for k, v in trained.items()})
    expected = model.merge_and_unload().state_dict()  # peft's merge
    merged = load_file(os.path.join(out, "model.safetensors"))
    assert set(merged) - {"lm_head.weight"} == set(expected) - {"lm_head.weight"}
    for k in merged:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           peft_llama().get_base_model().state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert not os.path.exists(os.path.join(out, "adapter_config.json")), "from_pretrained would apply the adapter twice"

    ckpt = os.path.join(out, "checkpoint-2")
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), os.path.join(ckpt, "adapter"))
    state = restored.state_dict()
    assert set(state) == set(trained)
    assert all(torch.equal(state[k].double(), trained[k]) for k in trained), "checkpoint != trained model"
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = batch(0, 0, VOCAB)
    assert torch.allclose(plain(input_ids=ids).logits, restored(input_ids=ids).logits, atol=1e-4)


def test_a_peft_model_passed_in_trains_its_base_too(tmp_path):
    from trainers import _args, _dataset

    from lomo_trainer import LOMOTrainer

    model = peft_llama()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)  # as get_peft_model leaves it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LOMOTrainer(model=model, args=_args(str(tmp_path), max_steps=2, learning_rate=0.05), train_dataset=_dataset(),
                          lomo_args={"lora": {"optimizer": ADAMW}})
    trainer.train()
    trainer.create_model_card(model_name="m")
    card = open(os.path.join(str(tmp_path), "README.md")).read()
    assert "- optimizer: LOMO (fused into backward, lomo_trainer)" in card
    assert "LoRA adapters by AdamW (lr=0.02, betas=[0.8, 0.9], eps=0.001, weight_decay=0.1), merged" in card
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "base_model.model.model.layers.0.mlp.up_proj.weight" in moved
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in moved
    with pytest.raises(ConfigError, match="already a peft model: remove the lora block's LoraConfig fields"):
        LOMOTrainer(model=model, args=_args(str(tmp_path)), train_dataset=_dataset(), lomo_args={"lora": LORA})


def test_deepspeed_json_lora_block_and_one_home(tmp_path):
    from trainers import _args

    from lomo_trainer.config import validate

    ds = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO"}, "lora": {**LORA, "optimizer": ADAMW}}
    s = validate(ds, _args(str(tmp_path)))
    assert s.lora["config"]["r"] == 4 and s.lora["optimizer"]["type"] == "AdamW"
    with pytest.raises(ConfigError, match=r"lomo_args.lora=.* but lora \(DeepSpeed config\)=.*one setting given in two places"):
        validate(ds, _args(str(tmp_path)), {"lora": {**LORA, "r": 8}})
    with pytest.raises(ConfigError, match=r"lora has unknown key\(s\) \['rank'\].*DeepSpeed config's lora block"):
        validate({**ds, "lora": {"rank": 8}}, _args(str(tmp_path)))


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_deepspeed_schedulers_drive_the_adapter_lr_from_its_own_peak(kind):
    from trainers import _args

    from lomo_trainer.schedulers import deepspeed_scheduler

    model = peft_llama()
    opt = LOMO(model, lr=0.05, adapters=adapter_parameters(model), adapter_optimizer=ADAMW)
    params = {"warmup_min_lr": 0.01} if kind != "WarmupCosineLR" else {}
    sched = deepspeed_scheduler({"type": kind, "params": {**params, "warmup_num_steps": 3}}, opt, 10, _args("/tmp"))
    for _ in range(8):
        base, adapter = (g["lr"] for g in opt.param_groups)
        assert adapter == pytest.approx(base * ADAMW["params"]["lr"] / 0.05, rel=1e-12), (base, adapter)
        sched.step()
    assert opt.param_groups[0]["lr"] != 0.05 or kind == "WarmupLR"


def test_non_finite_adapter_gradient_leaves_adapters_and_state_and_is_counted():
    """One pass (no clipping, fp32): the loss is finite, so the base updates inside backward; an adapter gradient
    that is NaN leaves every adapter and the AdamW state as they were, and the next step's sync counts the step."""
    model = peft_llama()
    adapters = adapter_parameters(model)
    opt = LOMO(model, lr=0.05, adapters=adapters, adapter_optimizer=ADAMW)
    poison = {"on": False}
    adapters[0].register_hook(lambda g: g * float("nan") if poison["on"] else g)

    def step(i):
        b = batch(i, 0, VOCAB)
        opt.step(lambda: model(input_ids=b, labels=b).loss)

    def snapshot():
        a = opt.adapters
        return [p.detach().clone() for p in adapters] + [a.masters[p].detach().clone() for p in a.params] + \
            [v.clone() for p in a.params for v in a.optimizer.state[a.masters[p]].values()]

    step(0)
    before, base = snapshot(), model.base_model.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    poison["on"] = True
    step(1)
    poison["on"] = False
    after = snapshot()
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a NaN adapter gradient changed adapters or state"
    assert not torch.equal(base, model.base_model.model.model.layers[0].mlp.up_proj.weight), "the base did update"
    assert opt.skipped_steps == 0
    step(2)
    assert (opt.skipped_steps, opt.update_overflows) == (1, 1)
    assert not all(torch.equal(x, y) for x, y in zip(after, snapshot())), "the next finite step updates again"


def train_fp16_overflow(rank, world):
    from models import allow_cpu_fp16

    allow_cpu_fp16()
    model = peft_llama()
    engine, *_ = deepspeed.initialize(model=model, config=dict(DS_CONFIG, fp16={"enabled": True}))
    opt = LOMO(engine, lr=0.05, clip_grad_norm=1.0, fp16={"initial_scale_power": 8, "hysteresis": 1},
               adapters=adapter_parameters(model), adapter_optimizer=ADAMW)
    a = opt.adapters
    log = []
    for step in range(3):
        b = batch(step, rank, VOCAB)
        if step == 1:
            opt.loss_scaler.scale = 2.0 ** 40  # every fp16 gradient overflows
        if step == 2:
            opt.loss_scaler.scale = 2.0 ** 8
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = [p.detach().clone() for p in engine.module.parameters()]
        state = [v.clone() for p in a.params for v in (a.masters[p], *a.optimizer.state[a.masters[p]].values())]
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            same_w = all(torch.equal(w, p) for w, p in zip(weights, engine.module.parameters()))
        new = [v for p in a.params for v in (a.masters[p], *a.optimizer.state[a.masters[p]].values())]
        same_s = len(state) == len(new) and all(torch.equal(x, y) for x, y in zip(state, new))
        log.append((opt.last_step_skipped, same_w, same_s))
    return log


@pytest.mark.multirank
def test_zero3_fp16_overflow_skips_base_adapters_and_adamw_state():
    log = run_ranks(train_fp16_overflow, 2)
    assert log[0] == log[1], "ranks disagree"
    assert log[0] == [(False, False, False), (True, True, True), (False, False, False)], log[0]


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2])
def test_accumulation_with_adapters_equals_the_large_batch(world):
    """Two micro-steps into the shard buffer (base and adapters alike), one update: the float64 reference's step
    on both micro-batches at once, with global-norm clipping over both sets from the buffers."""
    params = run_ranks(train_accumulated, world)[0]
    model = peft_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    assert_close(params, reference(model, STEPS, 2 * world, lr=0.3, clip_grad_norm=0.5), init)


def train_accumulated(rank, world):
    model = peft_llama()
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    opt = LOMO(engine, lr=0.3, clip_grad_norm=0.5, accumulate=True, adapters=adapter_parameters(model),
               adapter_optimizer=ADAMW)
    for step in range(STEPS):
        # micro-batches of rank r: batch(step, 2r) and batch(step, 2r + 1), each weighted 1/2
        first, last = (batch(step, 2 * rank + j, VOCAB) for j in range(2))
        opt.accumulate(lambda: engine.module(input_ids=first, labels=first).loss / 2)
        opt.step(lambda: engine.module(input_ids=last, labels=last).loss / 2)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
