"""LOMOTrainer end to end on CPU: 2 ZeRO-3 ranks against a float64 SGD reference, save/load, SIGTERM + resume."""
import os
import signal

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from distributed import run_ranks
from models import VOCAB, allow_cpu_fp16, reference_sgd, tiny_llama
from trainers import STEPS, Recorder, _args, ds_config, gathered_weights, make_trainer

def train_and_compare(rank, world, out, clip, zero3=True, checkpointing=False):
    rec = Recorder()
    trainer = make_trainer(_args(out, ds_config(clip) if zero3 else None, max_grad_norm=clip,
                                 gradient_checkpointing=checkpointing), rec)
    trainer.train()
    assert trainer.model.is_gradient_checkpointing == checkpointing
    weights = gathered_weights(trainer)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    grad_norms = [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h]
    return weights, [b for _, b in rec.batches], lrs, grad_norms


@pytest.mark.multirank
@pytest.mark.parametrize("clip,zero3,ckpt", [(0.0, True, False), (0.5, True, True), (0.5, False, False)],
                         ids=["zero3", "zero3-clip-checkpointing", "no-deepspeed-clip"])
def test_trainer_two_ranks_matches_sgd(tmp_path, clip, zero3, ckpt):
    results = run_ranks(train_and_compare, 2, str(tmp_path), clip, zero3, ckpt)
    weights, _, lrs, grad_norms = results[0]
    batches = [[results[r][1][s] for r in range(2)] for s in range(STEPS)]
    assert not torch.equal(batches[0][0], batches[0][1]), "ranks must see different data"
    # linear schedule with 2 warmup steps over 6: lr used at step s is 0.5 * factor(s)
    factors = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    assert lrs == pytest.approx([0.5 * f for f in factors[1:]] + [0.0])
    if clip:
        assert all(g is not None for g in grad_norms) and max(grad_norms) > clip, "clipping must bind"
    ref = _reference_with_schedule(batches, factors, clip)
    for name, expected in ref.items():
        err = (weights[name] - expected).abs().max().item()
        assert err <= 3e-6 * (1 + expected.abs().max().item()), f"{name}: off by {err:.2e}"


def _reference_with_schedule(batches, factors, clip):
    """float64 SGD, one step at a time so the lr follows the schedule."""
    model = tiny_llama().double()
    for step, lr_factor in enumerate(factors):
        state = reference_sgd(model, 1, 2, VOCAB, lr=0.5 * lr_factor, clip_grad_norm=clip or None,
                              batches=[batches[step]])
        model.load_state_dict(state, strict=False)
    return {n: p.detach() for n, p in model.named_parameters()}


class SigtermAt(TrainerCallback):
    def __init__(self, step, rank):
        self.step, self.rank = step, rank

    def on_step_end(self, args, state, control, **kw):
        import torch.distributed as dist

        if state.global_step == self.step and dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def run_uninterrupted(rank, world, out):
    trainer = make_trainer(_args(out, ds_config(0.5), max_grad_norm=0.5))
    trainer.train()
    return gathered_weights(trainer)


def run_interrupted(rank, world, out):
    args = _args(out, ds_config(0.5), max_grad_norm=0.5, save_strategy="steps", save_steps=100)
    with pytest.raises(SystemExit) as exit_info:
        make_trainer(args, callbacks=[SigtermAt(3, rank=1)]).train()  # only rank 1 gets the signal
    assert exit_info.value.code == 128 + signal.SIGTERM
    return sorted(os.listdir(out))


def run_resumed(rank, world, out, save_dir):
    trainer = make_trainer(_args(out, ds_config(0.5), max_grad_norm=0.5, save_strategy="steps", save_steps=100))
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model(save_dir)
    return gathered_weights(trainer), trainer.state.global_step


@pytest.mark.multirank
def test_sigterm_saves_and_resume_equals_uninterrupted(tmp_path):
    # each phase in fresh ranks: accelerate allows one DeepSpeed Accelerator per process
    expected = run_ranks(run_uninterrupted, 2, str(tmp_path / "a"))[0]
    saved = run_ranks(run_interrupted, 2, str(tmp_path / "b"))[0]
    got, final_step = run_ranks(run_resumed, 2, str(tmp_path / "b"), str(tmp_path / "final"))[0]
    assert saved == ["checkpoint-4"], saved  # SIGTERM after step 3 is shared at step 4's sync
    assert final_step == STEPS
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"resumed run differs at {name}"

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    reference = tiny_llama()
    reference.load_state_dict({k: v.float() for k, v in got.items()}, strict=False)
    with torch.no_grad():
        assert loaded(input_ids=ids, labels=ids).loss.item() == reference(input_ids=ids, labels=ids).loss.item()


def train_with_loggers(rank, world, out):
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=out, WANDB_PROJECT="lomo-test", WANDB_SILENT="true")
    trainer = make_trainer(_args(out, None, max_grad_norm=0.5, report_to=["tensorboard", "wandb"],
                                 max_steps=3))
    trainer.train()
    import wandb
    wandb.finish()  # a forked rank skips atexit, where a normal script finishes the run
    return trainer.state.log_history


@pytest.mark.multirank
def test_metrics_reach_tensorboard_and_wandb(tmp_path):
    history = run_ranks(train_with_loggers, 1, str(tmp_path))[0]
    wanted = {"loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb"}
    assert wanted <= set(history[0]), history[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "tfevents" in f]
    assert events, "no tensorboard event file"
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in wanted} <= tags, tags

    runs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "wandb") for f in fs if f.endswith(".wandb")]
    assert runs, "no offline wandb run"
    raw = open(runs[0], "rb").read()  # history keys are stored as plain strings in the run's records
    missing = [k for k in wanted if f"train/{k}".encode() not in raw]
    assert not missing, f"wandb run lacks {missing}"


def crash_while_saving(rank, world, out):
    from lomo_trainer.trainer import last_checkpoint

    trainer = make_trainer(_args(out, None, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    before = sorted(os.listdir(os.path.join(out, "checkpoint-2")))

    def dies_half_way(output_dir=None, _internal_call=False):
        open(os.path.join(output_dir, "model.safetensors"), "w").write("partial")
        raise RuntimeError("simulated crash")

    trainer.save_model = dies_half_way
    trainer.state.global_step = 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer._save_checkpoint(trainer.model)
    after = sorted(os.listdir(os.path.join(out, "checkpoint-2")))
    return before, after, last_checkpoint(out), sorted(os.listdir(out))


@pytest.mark.multirank
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path):
    before, after, latest, listing = run_ranks(crash_while_saving, 1, str(tmp_path))[0]
    assert before == after and "model.safetensors" in after
    assert latest == str(tmp_path / "checkpoint-2"), "an unfinished .tmp folder must never count as a checkpoint"
    assert "checkpoint-4.tmp" in listing and "checkpoint-4" not in listing


def train_fp16(rank, world, out):
    allow_cpu_fp16()
    cfg = ds_config(0.5)
    cfg["fp16"] = {"enabled": "auto", "initial_scale_power": 19, "loss_scale_window": 100, "hysteresis": 1}
    trainer = make_trainer(_args(out, cfg, max_grad_norm=0.5, fp16=True))
    trainer.train()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float16}, "no fp32 master copy: fp16 weights"
    return [(h["learning_rate"], h["loss_scale"], h["skipped_steps"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.multirank
def test_trainer_fp16_overflow_skips_and_the_schedule_waits(tmp_path):
    log = run_ranks(train_fp16, 2, str(tmp_path))[0]
    skipped = [s for _, _, s in log]
    assert skipped[0] == 1 and skipped[-1] < STEPS, f"2^19 must overflow at first, then train: {log}"
    scales = [sc for _, sc, _ in log]
    assert scales[0] == 2.0 ** 18 and all(b == a / 2 or b == a for a, b in zip(scales, scales[1:]))
    # linear schedule, 2 warmup steps of 6: the lr advances only on steps that updated
    factor = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr for lr, _, _ in log] == pytest.approx([0.5 * factor[i + 1 - s] for i, s in enumerate(skipped)])


def train_checkpointed_recording_warnings(rank, world, out):
    import dataclasses
    import warnings

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    trainer = make_trainer(_args(out, None, max_steps=1, **{name: True}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.model.is_gradient_checkpointing
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.multirank
def test_activation_checkpointing_without_deprecation_warnings(tmp_path):
    messages = run_ranks(train_checkpointed_recording_warnings, 1, str(tmp_path))[0]
    assert not [m for m in messages if "checkpointing" in m], messages
