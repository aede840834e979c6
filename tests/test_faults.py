"""Faults a user meets: poisoned, truncated and foreign checkpoints, leftovers of a crash, divergence."""
import json
import logging
import os

import pytest
import torch
from transformers import TrainerCallback

from distributed import run_ranks
from trainers import _args, ds_config, gathered_weights, make_trainer


class FirstStep(TrainerCallback):
    """Records the first step a run executes (after any resume)."""

    first = None

    def on_step_begin(self, args, state, control, **kw):
        if self.first is None:
            self.first = state.global_step + 1


def train_then_resume(rank, world, out, resume, steps=4):
    """A plain-module run to ``steps``, resumed as asked; returns the weights and the first step it ran."""
    first = FirstStep()
    trainer = make_trainer(_args(out, None, max_steps=steps, save_strategy="steps", save_steps=2), callbacks=[first])
    trainer.train(resume_from_checkpoint=resume)
    return gathered_weights(trainer), first.first


def checkpoint_weights(folder):
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of 4 steps with checkpoints at 2 and 4, shared by the tests (each copies it)."""
    out = str(tmp_path_factory.mktemp("trained"))
    run_ranks(train_then_resume, 1, out, None)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


class Poison:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.multirank
@pytest.mark.parametrize("victim", ["lomo_state_rank0.pt", "scheduler.pt"])
def test_poisoned_state_file_runs_no_code(tmp_path, trained, victim):
    from lomo_trainer.checkpoint import write_manifest

    out = _copy(trained, tmp_path / "run")
    marker = str(tmp_path / "pwned")
    ckpt = os.path.join(out, "checkpoint-4")
    torch.save({"optimizer": Poison(marker), "rng": {}}, os.path.join(ckpt, victim))
    os.remove(os.path.join(ckpt, "lomo_manifest.json"))
    write_manifest(ckpt)  # an attacker can rewrite the manifest too: only the loader stands in the way
    with pytest.raises(RuntimeError) as err:
        run_ranks(train_then_resume, 1, out, True, 6)
    assert not os.path.exists(marker), "unpickling ran code from the checkpoint"
    line = [ln for ln in str(err.value).splitlines() if "CheckpointError" in ln][-1]
    assert f"checkpoint-4/{victim} cannot be loaded as plain tensors and numbers" in line


@pytest.mark.multirank
@pytest.mark.parametrize("damage", ["truncate-weights", "empty-trainer-state", "truncate-lomo-state"])
def test_broken_latest_checkpoint_falls_back_to_the_previous(tmp_path, trained, damage, caplog):
    out = _copy(trained, tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint-4")
    name = {"truncate-weights": "model.safetensors", "empty-trainer-state": "trainer_state.json",
            "truncate-lomo-state": "lomo_state_rank0.pt"}[damage]
    path = os.path.join(ckpt, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(0 if damage == "empty-trainer-state" else size // 2)

    # true: the newest whole checkpoint (step 2) is used, with a warning that names the broken file
    with caplog.at_level(logging.WARNING, logger="lomo_trainer.checkpoint"):
        from lomo_trainer.checkpoint import resolve
        assert resolve(True, out) == os.path.join(out, "checkpoint-2")
    assert any(name in r.getMessage() and "skipping a broken checkpoint" in r.getMessage() for r in caplog.records)
    # the broken one named explicitly: one line, naming the file
    from lomo_trainer.errors import CheckpointError
    with pytest.raises(CheckpointError) as err:
        resolve(ckpt, out)
    assert "\n" not in str(err.value) and f"{name}" in str(err.value) and "older checkpoint" in str(err.value)

    _, first = run_ranks(train_then_resume, 1, out, True, 4)[0]
    assert first == 3, "resumed from checkpoint-2, so step 3 is the first one run"


@pytest.mark.multirank
def test_resume_true_equals_uninterrupted_and_ignores_leftover_tmp(tmp_path, trained):
    import shutil

    out = _copy(trained, tmp_path / "run")
    shutil.rmtree(os.path.join(out, "checkpoint-4"))
    os.makedirs(os.path.join(out, "checkpoint-4.tmp"))  # a crash mid-save left this
    open(os.path.join(out, "checkpoint-4.tmp", "model.safetensors"), "w").write("partial")
    weights, first = run_ranks(train_then_resume, 1, out, True, 4)[0]
    assert first == 3
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"], "leftovers of a crash are removed at start"
    expected = checkpoint_weights(os.path.join(trained, "checkpoint-4"))  # the uninterrupted run
    for name in expected:
        assert torch.equal(expected[name], weights[name]), name


def stock_trainer_run(rank, world, out):
    from transformers import Trainer

    from trainers import _dataset
    from models import tiny_llama

    args = _args(out, None, max_steps=3, save_strategy="steps", save_steps=3, optim="sgd")
    Trainer(model=tiny_llama(), args=args, train_dataset=_dataset()).train()


def lomo_resume_stock(rank, world, out, steps):
    trainer = make_trainer(_args(out, None, max_steps=steps))
    trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-3"))
    lrs = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    return gathered_weights(trainer), trainer.state.global_step, lrs


@pytest.mark.multirank
def test_stock_trainer_checkpoint_resumes_weights_and_step(tmp_path):
    out = str(tmp_path)
    run_ranks(stock_trainer_run, 1, out)
    weights, step, _ = run_ranks(lomo_resume_stock, 1, out, 3)[0]
    assert step == 3
    saved = checkpoint_weights(os.path.join(out, "checkpoint-3"))
    for name, value in saved.items():
        assert torch.equal(weights[name], value), name
    _, step, lrs = run_ranks(lomo_resume_stock, 1, out, 6)[0]
    assert step == 6 and max(lrs) == 6, lrs
    # linear schedule, 2 warmup steps over 6, continued after the stock run's step 3: lr after step s is
    # 0.5 * (6 - s) / 4
    assert [lrs[s] for s in (4, 5, 6)] == pytest.approx([0.25, 0.125, 0.0])


def deepspeed_only_checkpoint(rank, world, out):
    from lomo_trainer.errors import CheckpointError

    folder = os.path.join(out, "checkpoint-9")
    os.makedirs(os.path.join(folder, "global_step9"))
    json.dump({"global_step": 9}, open(os.path.join(folder, "trainer_state.json"), "w"))
    trainer = make_trainer(_args(out, None, max_steps=12))
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights .* zero_to_fp32.py"):
        trainer.train(resume_from_checkpoint=folder)


@pytest.mark.multirank
def test_deepspeed_only_checkpoint_is_named(tmp_path):
    run_ranks(deepspeed_only_checkpoint, 1, str(tmp_path))


def diverge(rank, world, out, clip):
    from lomo_trainer.errors import TrainingDiverged

    trainer = make_trainer(_args(out, ds_config(clip), learning_rate=1e30, max_grad_norm=clip, max_steps=20,
                                 save_strategy="steps", save_steps=1))
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    return str(err.value), trainer.state.global_step


@pytest.mark.multirank
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["no-clip", "clip"])
def test_divergence_stops_the_run_and_saves_nothing_non_finite(tmp_path, clip):
    (message, step), _ = run_ranks(diverge, 2, str(tmp_path), clip)
    assert "lower learning_rate or clip (max_grad_norm)" in message and "\n" not in message, message
    assert step < 20
    from safetensors.torch import load_file

    for folder in sorted(os.listdir(tmp_path)):
        if folder.startswith("checkpoint-") and not folder.endswith(".tmp"):
            for name, value in load_file(os.path.join(tmp_path, folder, "model.safetensors")).items():
                assert torch.isfinite(value).all(), f"{folder} holds non-finite {name}"


def nan_loss_from_step(rank, world, out, clip, bad_from):
    from lomo_trainer.errors import TrainingDiverged

    trainer = make_trainer(_args(out, ds_config(clip), max_grad_norm=clip, max_steps=20))
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, **kw):  # a finite forward, then a non-finite loss from step ``bad_from`` on
        loss = compute_loss(model, inputs, **kw)
        return loss * float("nan") if trainer.state.global_step + 1 >= bad_from else loss

    trainer.compute_loss = poisoned
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    skipped = [h.get("skipped_steps") for h in trainer.state.log_history if "loss" in h]
    weights = gathered_weights(trainer)  # collective
    finite = all(torch.isfinite(w).all() for w in weights.values()) if rank == 0 else True
    return str(err.value), skipped, trainer.state.global_step, finite


@pytest.mark.multirank
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["one-pass", "norm-pass"])
def test_non_finite_loss_is_skipped_counted_and_stops_the_run(tmp_path, clip):
    message, skipped, step, finite = run_ranks(nan_loss_from_step, 2, str(tmp_path), clip, 3)[0]
    assert message.startswith("training diverged: 5 steps in a row (up to step 7)"), message
    assert step == 7 - 1 and skipped == [0, 0, 1, 2, 3, 4, 5], skipped
    assert finite, "a non-finite loss reached an update"


def save_nan(rank, world, out):
    from lomo_trainer.errors import TrainingDiverged

    trainer = make_trainer(_args(out, ds_config(), max_steps=1))
    trainer.train()
    from lomo_trainer import _zero
    with torch.no_grad():
        if rank == 1:  # one rank's shard is enough: the check is collective
            _zero.local_data(next(trainer.model.parameters())).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite weights"):
        trainer.save_model(os.path.join(out, "final"))
    return os.path.exists(os.path.join(out, "final"))


@pytest.mark.multirank
def test_non_finite_model_is_never_saved(tmp_path):
    assert run_ranks(save_nan, 2, str(tmp_path)) == [False, False]


@pytest.mark.multirank
def test_resume_on_another_world_size_warns_with_numbers(tmp_path, trained, caplog):
    out = _copy(trained, tmp_path / "run")
    caplog.set_level(logging.WARNING)

    def resume_two_ranks(rank, world):
        import io
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logging.getLogger("lomo_trainer").addHandler(handler)
        train_then_resume(rank, world, out, True, 6)
        return stream.getvalue()

    logs = run_ranks(resume_two_ranks, 2)[0]
    assert "written by 1 processes with a global batch of 2; this run has 2 and 4" in logs, logs
