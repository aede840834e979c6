"""A hostile but realistic user (issue 23): every bad input is one line, no internal crash, no silent wrong result,
nothing already saved is lost. Start-up checks also assert that no process group was created."""
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from distributed import run_ranks
from models import VOCAB, tiny_llama
from trainers import _args, _dataset, make_trainer

from lomo_trainer import cli
from lomo_trainer.checkpoint import problem, resolve, write_manifest
from lomo_trainer.errors import CheckpointError, ConfigError, Interrupted, SaveFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "lomo_trainer", "assets", "tiny-llama")
DEFAULT = json.load(open(os.path.join(ROOT, "configs", "default_cpu.json")))
ONE_LINE = re.compile(r"^lomo-train: error: [^\n]+$")


# ------------------------------------------------------------------ lomo-train, training stubbed out
@pytest.fixture
def lomo_train(tmp_path, capsys, monkeypatch):
    """main() on the default run config with ``changes`` (None deletes a key); training is stubbed (``train`` may
    replace the stub), so a check that fails to fire shows as "reached training"."""
    reached = []
    monkeypatch.setattr(cli, "_train", lambda run, kwargs, lomo: reached.append((run, kwargs)) or 0)

    def call(*overrides, train=None, **changes):
        if train is not None:
            monkeypatch.setattr(cli, "_train", train)
        values = {**DEFAULT, "output_dir": str(tmp_path / "out"), **changes}
        run = tmp_path / "run.json"
        run.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
        capsys.readouterr()  # what the test printed setting up
        rc = cli.main([str(run), *overrides])
        assert not torch.distributed.is_initialized(), "a start-up check must come before any process group"
        return rc, capsys.readouterr().err.strip(), reached
    return call


def refused(lomo_train, match, *overrides, code=2, **changes):
    rc, err, reached = lomo_train(*overrides, **changes)
    assert not reached, "reached training"
    assert rc == code, err
    assert ONE_LINE.match(err), err
    assert re.search(match, err), err
    return err


def model_folder(tmp_path, name="model", weights=True, **config_changes):
    """A copy of the shipped tiny model, with weights saved (safetensors) unless ``weights`` is False."""
    folder = tmp_path / name
    shutil.copytree(TINY, folder)
    if weights:
        from transformers import AutoConfig, AutoModelForCausalLM
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY)).save_pretrained(folder)
    if config_changes:
        cfg = json.load(open(folder / "config.json"))
        cfg.update(config_changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


# ------------------------------------------------------------------ exit 0 with a wrong result
@pytest.mark.parametrize("epochs, match", [
    (0, r"num_train_epochs=0 with max_steps=-1 trains nothing \(and would save the untrained model"),
    (-1, r"num_train_epochs=-1 is negative \(with max_steps=-1\): set num_train_epochs > 0 or max_steps > 0"),
    (-0.5, r"num_train_epochs=-0.5 is negative")])
def test_no_epochs_and_no_max_steps_is_refused(lomo_train, epochs, match):
    refused(lomo_train, match, num_train_epochs=epochs)


def test_max_steps_wins_over_zero_epochs(lomo_train):
    rc, _, reached = lomo_train(num_train_epochs=0, max_steps=3)
    assert rc == 0 and reached


def test_negative_epochs_refused_by_the_trainer(tmp_path):
    with pytest.raises(ConfigError, match=r"num_train_epochs=-2 is negative"):
        make_trainer(_args(str(tmp_path), None, max_steps=-1, num_train_epochs=-2))


HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); " \
       "print('held', flush=True); time.sleep(120)"


@pytest.fixture
def held(tmp_path):
    """Another process holding output_dir's lock, as a running lomo-train does; ``held.kill()`` kills it."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_in_the_same_output_dir_is_refused_until_the_first_dies(lomo_train, held, tmp_path):
    refused(lomo_train, r"output_dir='.*out' is in use by another running training run")
    held.kill()
    held.wait()  # a killed run leaves no lock behind
    rc, _, reached = lomo_train()
    assert rc == 0 and reached


def test_trainer_refuses_an_output_dir_in_use_and_leaves_its_checkpoints(held, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "checkpoint-2.tmp"))  # the other run is saving: this must not be removed
    trainer = make_trainer(_args(out, None, max_steps=2, save_strategy="steps", save_steps=1))
    with pytest.raises(CheckpointError, match="is in use by another running training run"):
        trainer.train()
    assert os.listdir(out) == ["checkpoint-2.tmp"] and trainer.state.global_step == 0


def test_the_same_process_may_train_twice_in_its_folder(tmp_path):
    out = str(tmp_path)
    make_trainer(_args(out, None, max_steps=1)).train()
    assert make_trainer(_args(out, None, max_steps=2)).train().global_step == 2


def nan_loss_at(trainer, steps):
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, **kw):
        loss = compute_loss(model, inputs, **kw)
        return loss * float("nan") if trainer.state.global_step + 1 in steps else loss
    trainer.compute_loss = poisoned


def test_a_skipped_step_logs_no_loss_it_did_not_have(tmp_path):
    trainer = make_trainer(_args(str(tmp_path), None, max_steps=4))
    nan_loss_at(trainer, {1, 2})
    trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["skipped_steps"] for h in rows] == [1, 2, 2, 2]
    assert math.isnan(rows[0]["loss"]) and math.isnan(rows[1]["loss"]), rows  # was 0.0
    assert all(math.isfinite(h["loss"]) and h["loss"] > 1 for h in rows[2:]), rows


def test_a_window_with_one_skipped_step_reports_the_others_mean(tmp_path):
    trainer = make_trainer(_args(str(tmp_path), None, max_steps=4, logging_steps=2))
    nan_loss_at(trainer, {2})
    trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 1 for h in rows), rows


def masked_dataset(masked_rows):
    from datasets import Dataset

    ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[masked_rows] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_batches_without_target_tokens_are_skipped_not_divergence(tmp_path, caplog):
    from lomo_trainer import LOMOArguments, LOMOTrainer

    args = _args(str(tmp_path), None, max_steps=6, learning_rate=0.1, warmup_steps=0)
    # batches of 2 in order: steps 2 and 3 have no target token at all
    trainer = LOMOTrainer(model=tiny_llama(), args=args, train_dataset=masked_dataset([2, 3, 4, 5]),
                          lomo_args=LOMOArguments(max_consecutive_skips=1))
    trainer.get_train_dataloader = lambda: _sequential(trainer)
    with caplog.at_level(logging.WARNING, logger="lomo_trainer"):
        trainer.train()  # used to stop at step 2: "training diverged ... lower learning_rate"
    assert trainer.state.global_step == 6 and trainer.lomo_optimizer.skipped_steps == 0
    assert sum("no target token" in r.getMessage() for r in caplog.records) == 2
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [math.isnan(h["loss"]) for h in rows] == [False, True, True, False, False, False], rows
    lrs = [h["learning_rate"] for h in rows]
    assert lrs[1] == lrs[2] == lrs[0], "a step that changed nothing leaves the schedule alone"


def _sequential(trainer):
    from torch.utils.data import DataLoader

    return trainer.accelerator.prepare(DataLoader(trainer.train_dataset, batch_size=2, shuffle=False,
                                                  collate_fn=trainer.data_collator))


class _EachStep(TrainerCallback):
    """Per step: whether the loop was told it was skipped, skipped_steps, and this rank's weights (its shards under
    ZeRO-3)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        from lomo_trainer import _zero

        weights = [_zero.local_data(p).detach().clone() for p in self.trainer.model.parameters()]
        self.steps.append((self.trainer.optimizer.step_was_skipped, self.trainer.lomo_optimizer.skipped_steps,
                           weights))


def _no_target_run(out, ds, gas, clip, masked, max_steps):
    """A run over ``masked_dataset(masked)`` in order, counting lomo_trainer's host reads in each training_step."""
    from host_reads import HostReads

    from lomo_trainer import LOMOArguments, LOMOTrainer

    class Counting(LOMOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            with HostReads() as reads:
                loss = super().training_step(model, inputs, num_items_in_batch)
            self.host_reads.append((self.accelerator.sync_gradients, reads.where))
            return loss

    args = _args(out, ds, max_steps=max_steps, learning_rate=0.1, warmup_steps=0, gradient_accumulation_steps=gas,
                 max_grad_norm=clip)
    trainer = Counting(model=tiny_llama(), args=args, train_dataset=masked_dataset(masked),
                       lomo_args=LOMOArguments(max_consecutive_skips=1))
    trainer.host_reads = []
    trainer.get_train_dataloader = lambda: _sequential(trainer)
    each = _EachStep(trainer)
    trainer.add_callback(each)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("lomo_trainer").addHandler(handler)
    try:
        trainer.train()
    finally:
        logging.getLogger("lomo_trainer").removeHandler(handler)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return dict(reads=trainer.host_reads, steps=each.steps, global_step=trainer.state.global_step,
                skipped=trainer.lomo_optimizer.skipped_steps, warned=sum("no target token" in w for w in warnings),
                nan=[math.isnan(h["loss"]) for h in rows], lrs=[h["learning_rate"] for h in rows])


def _check_no_target_run(run, empty, micro_batches):
    # the engine's one sync per step is lomo_trainer's only host read: none of num_items_in_batch, on no micro-batch
    assert len(run["reads"]) == len(empty) * micro_batches
    for i, (last, where) in enumerate(run["reads"]):
        assert last == ((i + 1) % micro_batches == 0)
        assert len(where) == (1 if last else 0) and all(w.startswith("optim/engine.py:") for w in where), \
            (i, where)
    assert run["global_step"] == len(empty) and run["skipped"] == 0 and run["warned"] == sum(empty)
    assert [e for e, _, _ in run["steps"]] == empty and {s for _, s, _ in run["steps"]} == {0}  # skipped, uncounted
    assert run["nan"] == empty, run["nan"]
    before = None
    for (was_empty, _, weights), lr in zip(run["steps"], run["lrs"]):
        if before is not None:
            assert all(torch.equal(a, b) for a, b in zip(before, weights)) == was_empty, "an empty step updated"
        before = weights
    assert all(run["lrs"][i] == run["lrs"][i - 1] for i in range(1, len(empty)) if empty[i]), \
        "an empty step leaves the schedule alone"


@pytest.mark.parametrize("gas, clip, masked, empty", [
    (1, 0.0, [2, 3, 4, 5], [False, True, True, False]),   # one pass: decided at the sync before backward
    (1, 1.0, [2, 3], [False, True, False]),               # global clipping: at the norm pass's sync
    (2, 0.0, [0, 1, 4, 5, 6, 7], [False, True, False])])  # the buffer; step 1's first micro-batch alone has none
def test_no_target_token_is_decided_at_the_steps_one_sync_without_a_host_read(tmp_path, gas, clip, masked, empty):
    run = _no_target_run(str(tmp_path), None, gas, clip, masked, len(empty))
    _check_no_target_run(run, empty, gas)


def zero3_no_target(rank, world, out):
    from trainers import ds_config

    return _no_target_run(out, ds_config(), 2, 0.0, [0, 1, 4, 5] + list(range(8, 16)), 3)


@pytest.mark.multirank
def test_zero3_no_target_token_with_accumulation_is_decided_at_the_steps_one_sync(tmp_path):
    # batches of 2 in order, alternating ranks: in step 1 rank 0's two micro-batches hold no target token but rank
    # 1's do (an ordinary step); in step 2 no rank's do (empty); step 3 is step 1's data again
    runs = run_ranks(zero3_no_target, 2, str(tmp_path))
    for run in runs:
        _check_no_target_run(run, [False, True, False], 2)
    assert runs[0]["warned"] == runs[1]["warned"] == 1


def test_resume_with_another_learning_rate_warns_naming_both(tmp_path, caplog):
    out = str(tmp_path)
    make_trainer(_args(out, None, max_steps=2, save_strategy="steps", save_steps=2)).train()
    trainer = make_trainer(_args(out, None, max_steps=4, learning_rate=0.1, lr_scheduler_type="cosine"))
    with caplog.at_level(logging.WARNING, logger="lomo_trainer"):
        trainer.train(resume_from_checkpoint=True)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "was trained with learning_rate 0.5; this run gives 0.1" in text and "0.1 is not used" in text, text
    assert "was trained with the linear schedule; this run gives cosine" in text, text
    assert trainer.lr_scheduler.base_lrs == [0.5], "what the warning says: the checkpoint's learning rate is kept"


# ------------------------------------------------------------------ checkpoints: internal crashes where one line is due
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A plain-module run of 4 steps with checkpoints 2 and 4 (tests copy it)."""
    out = str(tmp_path_factory.mktemp("saved"))
    make_trainer(_args(out, None, max_steps=4, save_strategy="steps", save_steps=2)).train()
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(ckpt, name, change):
    """Change a checkpoint file and write the manifest again, as someone who knows the format would."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckpt, name)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    run = json.load(open(os.path.join(ckpt, "lomo_manifest.json")))["run"]
    write_manifest(ckpt, **run)


def test_checkpoint_of_another_model_shape_names_the_first_mismatch(saved_run, tmp_path):
    out = _copy(saved_run, tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint-4")
    _rewrite(ckpt, "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    trainer = make_trainer(_args(out, None, max_steps=6))
    with pytest.raises(CheckpointError) as err:
        trainer.train(resume_from_checkpoint=ckpt)
    assert "\n" not in str(err.value)
    assert "model.safetensors: model.norm.weight has shape [32] but the model's model.norm.weight has [64]" \
        in str(err.value)
    assert problem(os.path.join(out, "checkpoint-2")) is None and problem(ckpt) is None, "nothing saved was lost"


def test_non_finite_weights_in_a_checkpoint_are_named_at_load(saved_run, tmp_path):
    out = _copy(saved_run, tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint-4")

    def plant(t):
        t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    _rewrite(ckpt, "model.safetensors", plant)
    trainer = make_trainer(_args(out, None, max_steps=6))
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.1.mlp.up_proj.weight holds NaN or inf"):
        trainer.train(resume_from_checkpoint=ckpt)


@pytest.mark.parametrize("change, match", [
    (lambda m: m["run"].update(world_size="2"), r"run.world_size=\"2\" must be an integer >= 1"),
    (lambda m: m["run"].update(global_batch=None), r"run.global_batch=null must be an integer >= 1"),
    (lambda m: m["run"].update(world_size=0), r"run.world_size=0 must be an integer >= 1"),
    (lambda m: m.update(run=[1, 2]), r"'run' is not an object"),
    (lambda m: m["files"]["scheduler.pt"].update(size="12"), r"files\['scheduler.pt'\] must be"),
    (lambda m: m.update(files=["model.safetensors"]), r"'files' is not an object"),
    (lambda m: m["files"].update({"../escape": {"size": 1}}), r"files\['../escape'\] must be"),
], ids=["world-size-str", "batch-null", "world-size-0", "run-list", "size-str", "files-list", "path-escape"])
def test_a_malformed_manifest_is_validated_not_a_type_error(saved_run, tmp_path, change, match):
    out = _copy(saved_run, tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint-4")
    path = os.path.join(ckpt, "lomo_manifest.json")
    manifest = json.load(open(path))
    change(manifest)
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError) as err:
        resolve(ckpt, out)
    assert "\n" not in str(err.value) and re.search(r"lomo_manifest.json is malformed: " + match, str(err.value))
    assert resolve(True, out) == os.path.join(out, "checkpoint-2"), "falls back to the previous checkpoint"


def test_manifest_run_record_with_wrong_types_falls_back_without_type_error(saved_run, tmp_path, caplog):
    """Before: a null global batch reached the resume warning's arithmetic (TypeError). Now the record is refused by
    name, and resume=True falls back to the previous checkpoint and trains on."""
    out = _copy(saved_run, tmp_path / "run")
    path = os.path.join(out, "checkpoint-4", "lomo_manifest.json")
    manifest = json.load(open(path))
    manifest["run"] = {"world_size": 3, "global_batch": None}
    json.dump(manifest, open(path, "w"))
    trainer = make_trainer(_args(out, None, max_steps=5))
    first = []
    trainer.add_callback(type("First", (TrainerCallback,), {
        "on_step_begin": lambda self, a, state, c, **k: first.append(state.global_step + 1)})())
    with caplog.at_level(logging.WARNING, logger="lomo_trainer.checkpoint"):
        assert trainer.train(resume_from_checkpoint=True).global_step == 5
    assert first[0] == 3, "resumed from checkpoint-2"
    assert any("run.global_batch=null must be an integer >= 1" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ the model folder
def test_vocab_smaller_than_the_tokenizer_is_refused_naming_both(lomo_train, tmp_path):
    folder = model_folder(tmp_path, weights=False, vocab_size=100)
    refused(lomo_train, r"the tokenizer has 142 tokens but the model's vocab_size is 100", model_name_or_path=folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_weights_file_is_named(lomo_train, tmp_path, damage):
    folder = model_folder(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    if damage == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:
        open(path, "wb").write(b"" if damage == "empty" else b"\x13\x00\x00\x00\x00\x00\x00\x00not a header")
    refused(lomo_train, rf"model weights file '{re.escape(path)}' cannot be read \(.*\): it is truncated or corrupt",
            model_name_or_path=folder, init_from_scratch=False)


class Poison:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_pytorch_model_bin_is_one_line_and_runs_no_code(tmp_path):
    folder = model_folder(tmp_path, weights=False)
    marker = str(tmp_path / "pwned")
    torch.save({"model.embed_tokens.weight": Poison(marker)}, os.path.join(folder, "pytorch_model.bin"))
    run = cli.RunArguments(model_name_or_path=folder)
    with pytest.raises(ConfigError) as err:
        cli.build_model(run, _args(str(tmp_path / "out")))
    assert not os.path.exists(marker)
    assert "\n" not in str(err.value) and "pytorch_model.bin holds pickled objects that are not plain tensors" in \
        str(err.value)
    assert not torch.distributed.is_initialized()


def test_non_finite_weights_as_loaded_are_named_before_any_step(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3, 1] = float("nan")
    from lomo_trainer import LOMOTrainer

    trainer = LOMOTrainer(model=model, args=_args(str(tmp_path), None), train_dataset=_dataset())
    with pytest.raises(ConfigError, match=r"the model's weight model.layers.0.self_attn.k_proj.weight holds NaN or "
                                          r"inf as loaded, before any step"):
        trainer.train()  # used to run 5 steps, then "training diverged ... lower learning_rate"
    assert trainer.state.global_step == 0 and not os.listdir(tmp_path)


# ------------------------------------------------------------------ configuration: one line at start-up
def test_train_batch_size_inconsistent_is_refused_at_start_up(lomo_train, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**json.load(open(os.path.join(ROOT, "configs", "zero3_cpu.json"))),
                              "train_batch_size": 48}))
    refused(lomo_train, r"train_batch_size=48 but micro batch 32 x 1 processes x 1 accumulation steps = 32",
            deepspeed=str(ds))


def test_unknown_model_type_is_one_line(lomo_train, tmp_path):
    folder = model_folder(tmp_path, weights=False, model_type="llama-nonexistent")
    refused(lomo_train, r"config.json cannot be used \(.*llama-nonexistent.*\)", model_name_or_path=folder)


def test_invalid_config_json_is_one_line(lomo_train, tmp_path):
    folder = model_folder(tmp_path, weights=False)
    open(os.path.join(folder, "config.json"), "w").write('{"model_type": "llama",\n "vocab_size": }')
    refused(lomo_train, r"config.json: invalid JSON at line 2 column 16", model_name_or_path=folder)


def test_tokenizer_without_pad_or_eos_is_refused(lomo_train, tmp_path):
    folder = model_folder(tmp_path, weights=False)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    for key in ("pad_token", "eos_token"):
        cfg[key] = None
    json.dump(cfg, open(cfg_path, "w"))
    refused(lomo_train, r"has neither a pad nor an eos token", model_name_or_path=folder)


def test_output_dir_that_is_a_file(lomo_train, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(lomo_train, r"output_dir='.*afile' is a file: pass a folder", output_dir=str(tmp_path / "afile"))


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_eval_strategy_without_an_evaluation_set(lomo_train, strategy):
    refused(lomo_train, rf"eval_strategy='{strategy}' but there is no evaluation set", eval_strategy=strategy,
            validation_file=None, eval_choices=None)


@pytest.mark.parametrize("key", ["train_file", "validation_file"])
def test_a_folder_as_data_file(lomo_train, tmp_path, key):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    refused(lomo_train, rf"{key}='.*data.jsonl' is a folder: pass a file", **{key: str(folder)})


def test_json_error_message_has_no_doubled_word(lomo_train, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a\tb", "completion": " positive"}\n')
    err = refused(lomo_train, r"line 1: invalid JSON \(Invalid control character at column 14\)",
                  train_file=str(path))
    assert "at at" not in err


# ------------------------------------------------------------------ saving: a full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/disk/file")


@pytest.mark.parametrize("where", ["manifest", "rank-state", "weights"])
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    from lomo_trainer import checkpoint

    out = str(tmp_path)
    trainer = make_trainer(_args(out, None, max_steps=4, save_strategy="steps", save_steps=2))

    class FullDiskAtStep4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                if where == "manifest":
                    monkeypatch.setattr(checkpoint, "write_manifest", _enospc)
                elif where == "rank-state":
                    monkeypatch.setattr(checkpoint, "save_rank_state", _enospc)
                else:
                    monkeypatch.setattr(type(trainer.model), "save_pretrained", _enospc)
    trainer.add_callback(FullDiskAtStep4())
    with pytest.raises(SaveFailed) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert "removed the unfinished checkpoint-4.tmp" in message and "checkpoint-2 is kept" in message, message
    assert sorted(os.listdir(out)) == ["checkpoint-2"], "no .tmp left, the previous checkpoint kept"
    assert problem(os.path.join(out, "checkpoint-2")) is None


def test_lomo_train_exits_1_with_one_line_when_the_disk_is_full(lomo_train):
    def full(run, kwargs, lomo):
        raise SaveFailed("writing the model to out failed: No space left on device")
    rc, err, _ = lomo_train(train=full)
    assert rc == 1 and ONE_LINE.match(err) and "No space left on device" in err, err


# ------------------------------------------------------------------ signals
class SendSignal(TrainerCallback):
    def __init__(self, signum, at_step=None, at_eval_batch=None):
        self.signum, self.at_step, self.at_eval_batch, self.eval_batches = signum, at_step, at_eval_batch, 0

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)

    def on_prediction_step(self, args, state, control, **kw):
        self.eval_batches += 1
        if self.eval_batches == self.at_eval_batch:
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_saves_the_steps_since_the_last_checkpoint_and_exits_130(tmp_path):
    out = str(tmp_path)
    trainer = make_trainer(_args(out, None, max_steps=6, save_strategy="steps", save_steps=2),
                           callbacks=[SendSignal(signal.SIGINT, at_step=2)])
    with pytest.raises(Interrupted) as err:
        trainer.train()  # used to be a KeyboardInterrupt traceback, nothing saved after checkpoint-2
    assert err.value.code == 130
    assert err.value.message == f"stopped by Ctrl-C (SIGINT) at step 3: saved {out}/checkpoint-3; resume with " \
                                f"--resume_from_checkpoint {out}/checkpoint-3"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    assert problem(os.path.join(out, "checkpoint-3")) is None


def assert_stops_at_the_first_eval_batch(trainer, sender, out):
    """SIGTERM sent at the first evaluation batch of step 2's evaluation (40 batches): the run stops there, saved."""
    with pytest.raises(Interrupted) as err:
        trainer.train()
    assert sender.eval_batches == 1, "waited for the whole evaluation (40 batches)"
    assert err.value.code == 143 and err.value.message.startswith(f"stopped by SIGTERM at step 2: saved {out}/checkpoint-2")
    assert problem(os.path.join(out, "checkpoint-2")) is None


def test_sigterm_during_a_long_evaluation_stops_between_batches(tmp_path):
    from lomo_trainer import LOMOTrainer

    out = str(tmp_path)
    sender = SendSignal(signal.SIGTERM, at_eval_batch=1)
    trainer = LOMOTrainer(model=tiny_llama(), args=_args(out, None, max_steps=6, eval_strategy="steps", eval_steps=2,
                                                         per_device_eval_batch_size=1),
                          train_dataset=_dataset(), eval_dataset=_dataset(40), callbacks=[sender])
    assert_stops_at_the_first_eval_batch(trainer, sender, out)


def test_sigterm_during_a_ranking_evaluation_stops_between_batches(tmp_path):
    """SuperGLUE's trainers evaluate by ranking candidates (their own loop, not the stock evaluation loop): a
    signal stops them between two scored batches too, saved and with the same line."""
    from lomo_trainer import LOMOTrainer
    from lomo_trainer.ranking import score_pairs
    from lomo_trainer.superglue.training import epoch_eval_trainer

    out = str(tmp_path)
    sender = SendSignal(signal.SIGTERM, at_eval_batch=1)
    pairs = [([1, 2, 3], [4, 5])] * 40

    def ranking_eval(model):
        return {"accuracy": float(sum(score_pairs(model, pairs, batch_size=1)))}

    trainer = epoch_eval_trainer(LOMOTrainer)(
        model=tiny_llama(), args=_args(out, None, max_steps=6, eval_strategy="steps", eval_steps=2),
        train_dataset=_dataset(), eval_dataset=_dataset(2), callbacks=[sender], ranking_eval=ranking_eval)
    assert_stops_at_the_first_eval_batch(trainer, sender, out)


def test_lomo_train_prints_one_line_for_a_signal(lomo_train):
    def stopped(run, kwargs, lomo):
        raise Interrupted(143, "stopped by SIGTERM at step 3: saved out/checkpoint-3")
    rc, err, _ = lomo_train(train=stopped)
    assert rc == 143 and err == "lomo-train: stopped by SIGTERM at step 3: saved out/checkpoint-3"


def test_ctrl_c_before_training_is_one_line(lomo_train):
    def interrupted(run, kwargs, lomo):
        raise KeyboardInterrupt
    rc, err, _ = lomo_train(train=interrupted)
    assert rc == 130 and err == "lomo-train: stopped by Ctrl-C (SIGINT) before training: nothing saved"


# ------------------------------------------------------------------ more than one rank
def resume_on_two_ranks(rank, world, out, break_rank):
    from lomo_trainer import checkpoint

    if rank == break_rank:
        def broken(folder, rank):
            raise CheckpointError(f"{folder}/lomo_state_rank{rank}.pt cannot be loaded (planted)")
        checkpoint.load_rank_state = broken
    trainer = make_trainer(_args(out, None, max_steps=6))
    try:
        trainer.train(resume_from_checkpoint=True)
    except CheckpointError as e:
        return str(e)
    return trainer.state.global_step


@pytest.mark.multirank
def test_a_stray_state_file_of_a_rank_the_checkpoint_never_had_is_ignored(saved_run, tmp_path):
    out = _copy(saved_run, tmp_path / "run")
    open(os.path.join(out, "checkpoint-4", "lomo_state_rank1.pt"), "wb").write(b"stray, not a state file")
    assert run_ranks(resume_on_two_ranks, 2, out, None) == [6, 6]


@pytest.mark.multirank
def test_an_error_on_one_rank_reaches_every_rank_as_the_same_line(saved_run, tmp_path):
    out = _copy(saved_run, tmp_path / "run")
    lines = run_ranks(resume_on_two_ranks, 2, out, 1)
    assert lines[0] == lines[1] and lines[0].endswith("lomo_state_rank1.pt cannot be loaded (planted)"), lines


def zero3_nan_weight(rank, world, out):
    from trainers import ds_config

    from lomo_trainer import LOMOTrainer

    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[-1, -1] = float("inf")  # the last shard: one rank holds it
    trainer = LOMOTrainer(model=model, args=_args(out, ds_config()), train_dataset=_dataset())
    with pytest.raises(ConfigError) as err:
        trainer.train()
    return str(err.value)


@pytest.mark.multirank
def test_non_finite_weights_are_named_on_every_zero3_rank(tmp_path):
    lines = run_ranks(zero3_nan_weight, 2, str(tmp_path))
    assert lines[0] == lines[1] and "model.embed_tokens.weight holds NaN or inf as loaded" in lines[0], lines


def lomo_train_deleting_validation(rank, world, out, validation):
    from lomo_trainer import LOMOTrainer

    train = LOMOTrainer.train

    def train_then_delete(self, *a, **kw):
        result = train(self, *a, **kw)
        os.remove(validation)  # someone cleans up the data folder while the run is still going
        return result
    LOMOTrainer.train = train_then_delete
    return cli.main([os.path.join(ROOT, "configs", "default_cpu.json"), "--output_dir", out, "--max_steps", "2",
                     "--validation_file", validation, "--max_eval_samples", "8", "--report_to", "none",
                     "--disable_tqdm", "true", "--deepspeed", ""])


@pytest.mark.multirank
def test_validation_file_deleted_mid_run(tmp_path):
    validation = str(tmp_path / "validation.jsonl")
    shutil.copy(os.path.join(ROOT, "lomo_trainer", "assets", "sentiment", "validation.jsonl"), validation)
    out = str(tmp_path / "out")
    assert run_ranks(lomo_train_deleting_validation, 1, out, validation) == [0]
    assert os.path.isfile(os.path.join(out, "eval_results.json")) and os.path.isfile(
        os.path.join(out, "model.safetensors"))
