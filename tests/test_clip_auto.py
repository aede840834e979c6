"""clip_mode "auto" (issue 24): the decision from the planner's figures (clip_choice.py), its wiring into LOMOTrainer,
and the two paths it chooses between, exact against the float64 reference with clipping that binds on 2 ZeRO-3 ranks,
and skipping an fp16 overflow alike."""
import logging

import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import clip_choice
from lomo_trainer.bench import planner
from lomo_trainer.bench.planner import plan_clip_mode as decide
from lomo_trainer.clip_choice import Choice, Figures, choose, resolve
from lomo_trainer.config import LOMOSettings
from lomo_trainer.optim.factory import build_optimizer, optimizer_kwargs
from models import DS_CONFIG, VOCAB, allow_cpu_fp16, batch, reference_sgd, tiny_llama

GIB = 2**30


def figures(buffered_gib, mem_gib=24.0):
    return Figures(gpu_mem_bytes=int(mem_gib * GIB), gpus=8, n_params=6_738_415_616, buffer_dtype="fp16",
                   buffer_bytes=int(1.57 * GIB), two_pass_peak=int(4.5 * GIB), buffered_peak=int(buffered_gib * GIB))


# ---------------------------------------------------------------- the decision: planner figures in, choice out
def test_buffered_where_the_buffer_fits_with_the_margin_else_two_passes():
    limit = (1 - clip_choice.MARGIN) * 24.0  # 21.6 GiB of a 24 GiB card
    fits = choose(figures(6.1))
    assert fits.clip_mode == "buffered"
    assert fits.line() == ("clip_mode auto -> buffered (one pass): buffer 1.57 GiB (fp16 x 6.738 B params / 8 GPUs), "
                           "planned peak 6.10 GiB buffered vs 4.50 GiB two-pass, limit 21.60 GiB (90% of 24.0 GiB): "
                           "the buffer fits, one forward+backward per step")
    assert choose(figures(limit)).clip_mode == "buffered"  # the margin's edge still fits
    over = choose(figures(limit + 0.01))
    assert over.clip_mode == "global" and "does not fit with the margin, two passes" in over.line()
    assert choose(figures(23.0)).clip_mode == "global"  # fits the card, not the margin


def test_cpu_and_an_unreadable_model_keep_two_passes_and_say_so():
    cpu = choose(figures(1.0), device="cpu")
    assert cpu.clip_mode == "global"
    assert cpu.line().startswith("clip_mode auto -> global (two passes): not on a GPU (cpu)")
    # no planner is asked off a GPU
    assert decide(None, "cpu", 512, gpus=8, gpu_mem_bytes=0, batch=2, dtype="fp32", buffer_dtype="fp32").clip_mode \
        == "global"
    unreadable = decide(object(), "cuda", 512, gpus=8, gpu_mem_bytes=24 * GIB, batch=2, dtype="fp16",
                        buffer_dtype="fp16")
    assert unreadable.clip_mode == "global"
    assert "the planner cannot read this model (" in unreadable.reason and "\n" not in unreadable.line()
    assert "first batch" in decide(None, "cuda", None, gpus=8, gpu_mem_bytes=24 * GIB, batch=2, dtype="fp16",
                                   buffer_dtype="fp16").reason


def test_decide_follows_the_planner_stubbed_to_fit_and_not_to_fit(monkeypatch):
    asked = {}

    def stub(buffered_gib):
        def clip_figures(inv, setup, optimizer):
            asked.update(seq_len=setup.seq_len, buffer_dtype=setup.accum_dtype, n_params=inv.n_params)
            return figures(buffered_gib)
        return clip_figures

    from lomo_trainer.bench.inventory import to_hf_config
    from lomo_trainer.bench.presets import PRESETS

    kw = dict(gpus=8, gpu_mem_bytes=24 * GIB, batch=2, dtype="fp16", buffer_dtype="fp16")
    monkeypatch.setattr(planner, "clip_figures", stub(6.0))
    assert decide(to_hf_config(PRESETS["7b"]), "cuda", 512, **kw).clip_mode == "buffered"
    assert asked == dict(seq_len=512, buffer_dtype="fp16", n_params=6_738_415_616)
    monkeypatch.setattr(planner, "clip_figures", stub(22.0))
    assert decide(to_hf_config(PRESETS["7b"]), "cuda", 512, **kw).clip_mode == "global"


def test_the_real_planner_on_8_x_24_gb():
    """The shipped recipe's setting (fp16, seq 512 x batch 2, activation checkpointing): 7B and 13B take the
    buffer, 65B keeps two passes (docs/accumulation.md's table)."""
    from lomo_trainer.bench.inventory import to_hf_config
    from lomo_trainer.bench.presets import PRESETS

    kw = dict(gpus=8, gpu_mem_bytes=24 * 10**9, batch=2, dtype="fp16", buffer_dtype="fp16",
              activation_checkpointing=True)
    got = {m: decide(to_hf_config(PRESETS[m]), "cuda", 512, **kw) for m in ("7b", "13b", "65b")}
    assert [got[m].clip_mode for m in ("7b", "13b", "65b")] == ["buffered", "buffered", "global"], got
    assert "buffer 1.57 GiB (fp16 x 6.738 B params / 8 GPUs)" in got["7b"].reason


def test_resolve_gives_the_factory_each_path():
    s = LOMOSettings(lr=0.1, clip_grad_norm=1.0, clip_mode="auto", fp16={"initial_scale_power": 16},
                     auto_buffer_dtype="fp16")
    one = optimizer_kwargs(resolve(s, Choice("buffered", "")))
    assert (one["accumulate"], one["clip_mode"], one["buffer_dtype"]) == (True, "global", torch.float16)
    two = optimizer_kwargs(resolve(s, Choice("global", "")))
    assert (two["accumulate"], two["clip_mode"]) == (False, "global") and "buffer_dtype" not in two
    assert optimizer_kwargs(s)["accumulate"] is False  # an unresolved "auto" takes the path needing no memory


def test_validate_leaves_auto_only_where_a_norm_pass_could_be_saved():
    from transformers import TrainingArguments

    from lomo_trainer.config import validate

    cfg = {**DS_CONFIG, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}

    def settings(**kw):
        return validate(cfg, TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], **kw))

    s = settings(max_grad_norm=1.0)
    assert (s.clip_mode, s.auto_buffer_dtype, s.accumulation_dtype) == ("auto", "fp32", None)
    s = settings(max_grad_norm=0.0)  # nothing to save: one pass already
    assert (s.clip_mode, s.auto_buffer_dtype) == ("global", None)
    s = settings(max_grad_norm=1.0, gradient_accumulation_steps=2)  # accumulation's buffer already gives one pass
    assert (s.clip_mode, s.accumulation_dtype) == ("global", "fp32")


# ---------------------------------------------------------------- the wiring in LOMOTrainer
def _trainer(tmp_path, **kw):
    from trainers import _args, make_trainer

    return make_trainer(_args(str(tmp_path), max_grad_norm=0.05, max_steps=1, **kw))


def test_trainer_on_cpu_keeps_two_passes_and_logs_why(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    assert trainer.lomo_settings.clip_mode == "auto"
    with caplog.at_level(logging.INFO, logger="lomo_trainer.trainer"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("clip_mode auto")]
    assert lines == ["clip_mode auto -> global (two passes): not on a GPU (cpu): the planner's figures are GPU "
                     "memory, two passes kept (set clip_mode \"buffered\" to force one pass)"]
    assert trainer.lomo_settings.clip_mode == "global" and trainer.lomo_optimizer.needs_norm_pass
    assert not trainer.lomo_optimizer.buffered


def test_trainer_takes_the_buffer_when_the_decision_says_so(tmp_path, monkeypatch, caplog):
    seen = {}

    def fits(model_config, device_type, seq_len, **kw):
        seen.update(kw, seq_len=seq_len)
        return Choice("buffered", "stubbed: fits")

    monkeypatch.setattr(planner, "plan_clip_mode", fits)
    trainer = _trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="lomo_trainer.trainer"):
        trainer.train()
    assert "clip_mode auto -> buffered (one pass): stubbed: fits" in caplog.text
    opt = trainer.lomo_optimizer
    assert opt.buffered and opt.buffer_dtype == torch.float32 and not opt.needs_norm_pass  # fp32 training: fp32 buffer
    assert trainer.lomo_settings.clip_mode == "buffered" and seen["buffer_dtype"] == "fp32"


# ---------------------------------------------------------------- both paths on 2 ZeRO-3 ranks
CLIP = dict(lr=0.5, clip_grad_norm=0.3)
STEPS = 3


def train_path(rank, world, buffered: bool, fp16=None, poison=None, steps=STEPS):
    """The path "auto" chooses (planner stubbed to fit or not) through resolve and the factory, as LOMOTrainer
    builds it; returns the gathered weights and a per-step log."""
    if fp16 is not None:
        allow_cpu_fp16()
    model = tiny_llama()
    cfg = dict(DS_CONFIG, **({"fp16": {"enabled": True}} if fp16 is not None else {}))
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    settings = LOMOSettings(lr=CLIP["lr"], clip_grad_norm=CLIP["clip_grad_norm"], clip_mode="auto", fp16=fp16,
                            auto_buffer_dtype="fp16" if fp16 is not None else "fp32")
    choice = choose(figures(6.0 if buffered else 23.0))
    opt = build_optimizer(resolve(settings, choice), engine)
    params = list(engine.module.parameters())

    def snapshot():
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}

    log = []
    for step in range(steps):
        b = batch(step, rank, VOCAB)
        calls = [0]

        def closure():
            calls[0] += 1
            loss = engine.module(input_ids=b, labels=b).loss.float()
            return loss * 1e8 if poison == step and rank == 0 else loss  # its fp16 gradient overflows on rank 0

        before = snapshot()
        opt.step(closure)
        log.append(dict(calls=calls[0], norm=opt.grad_norm, skipped=opt.last_step_skipped, scale=opt.loss_scale,
                        unchanged=all(torch.equal(before[n], v) for n, v in snapshot().items())))
    return snapshot(), log, choice.clip_mode, opt.buffered


@pytest.mark.multirank
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "two_pass"])
def test_each_path_equals_the_float64_reference_with_binding_clipping(buffered):
    weights, log, mode, has_buffer = run_ranks(train_path, 2, buffered)[0]
    assert (mode, has_buffer) == (("buffered", True) if buffered else ("global", False))
    assert [e["calls"] for e in log] == [1 if buffered else 2] * STEPS, log  # one forward+backward, or two
    assert all(e["norm"] > CLIP["clip_grad_norm"] for e in log), "the clip threshold must bind"
    model = tiny_llama()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_sgd(model, STEPS, 2, VOCAB, **CLIP)
    assert set(weights) == set(ref)
    for name, expected in ref.items():  # fp32 rounding of the weights themselves (norm weights are ~1), as zero3_runs
        moved = (expected - init[name]).abs().max().item()
        err = (weights[name] - expected).abs().max().item()
        assert moved > 1e-5, f"{name} hardly moved ({moved:.1e}): the test could not see a wrong update"
        assert err <= 2e-6 * (1 + expected.abs().max().item()), f"{name}: off by {err:.2e} (moved {moved:.2e})"


@pytest.mark.multirank
def test_fp16_overflow_in_the_buffered_path_skips_the_step_as_two_passes_do():
    fp16 = {"initial_scale_power": 12, "hysteresis": 1, "loss_scale_window": 100}
    one = run_ranks(train_path, 2, True, fp16, 1)[0]
    two = run_ranks(train_path, 2, False, fp16, 1)[0]
    assert one[3] and not two[3]
    skip = lambda log: [(e["skipped"], e["unchanged"], e["scale"]) for e in log]  # noqa: E731
    assert skip(one[1]) == skip(two[1]) == [(False, False, 2.0**12), (True, True, 2.0**11), (False, False, 2.0**11)]
    assert [e["calls"] for e in one[1]] == [1, 1, 1] and [e["calls"] for e in two[1]] == [2, 1, 2]
    for name, w in two[0].items():  # the same update from the same gradients: bit for bit
        assert torch.equal(one[0][name], w), name
