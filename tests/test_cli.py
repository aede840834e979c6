"""The default run, shortened: lomo-train on the shipped default config, 2 ZeRO-3 CPU ranks."""
import pytest
import json
import os

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_default(rank, world, out):
    from lomo_trainer.cli import main

    return main([os.path.join(ROOT, "configs", "default_cpu.json"), "--output_dir", out, "--max_steps", "12",
                 "--max_eval_samples", "40", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"])


@pytest.mark.multirank
def test_default_run_trains_saves_and_evaluates(tmp_path):
    out = str(tmp_path / "run")
    assert run_ranks(run_default, 2, out) == [0, 0]
    result = json.load(open(os.path.join(out, "eval_results.json")))
    assert 0.0 <= result["choice_accuracy"] <= 1.0
    # it trained: the logged loss falls from the first steps to the last (lr 0.5 on a learnable task)
    state = json.load(open(os.path.join(out, "trainer_state.json"))) if os.path.exists(
        os.path.join(out, "trainer_state.json")) else None
    losses = [h["loss"] for h in (state or {}).get("log_history", []) if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("review: great fun sentiment:", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def run_default_as_launched(rank, world, out, port):
    """As under torchrun: no process group yet, only the launcher's variables; lomo-train creates the group."""
    import torch.distributed as dist

    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = run_default(rank, world, out)
    return code, dist.is_initialized()


@pytest.mark.multirank
def test_lomo_train_destroys_the_process_group_it_created(tmp_path):
    """A process that exits with its group alive can abort in gloo's/NCCL's thread teardown after the run has
    succeeded (SIGABRT, and the launcher reports a failure); one that a caller set up is left to the caller."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run_ranks(run_default_as_launched, 2, str(tmp_path / "run"), port) == [(0, False), (0, False)]


def bad_input_as_launched(rank, world, out, port):
    """Under torchrun, with an input error the start-up checks find: one line, exit 2, and still no process group
    (TrainingArguments, built normally, would have created it before any check)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from lomo_trainer.cli import main

    code = main([os.path.join(ROOT, "configs", "default_cpu.json"), "--output_dir", out, "--num_train_epochs", "0"])
    return code, dist.is_initialized()


@pytest.mark.multirank
def test_bad_input_under_a_launcher_is_refused_before_any_process_group(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run_ranks(bad_input_as_launched, 2, str(tmp_path / "run"), port) == [(2, False), (2, False)]


def run_default_keeps_group(rank, world, out):
    import torch.distributed as dist

    return run_default(rank, world, out), dist.is_initialized()


@pytest.mark.multirank
def test_lomo_train_leaves_a_callers_process_group_alone(tmp_path):
    assert run_ranks(run_default_keeps_group, 2, str(tmp_path / "run")) == [(0, True), (0, True)]


# ------------------------------------------------------------------ bad input: one line, exit 2, no process group
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lomo_trainer import cli  # noqa: E402

DEFAULT = json.load(open(os.path.join(ROOT, "configs", "default_cpu.json")))
ZERO3 = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO", "params": {"lr": "auto"}}}


@pytest.fixture
def lomo_train(tmp_path, capsys, monkeypatch):
    """main() on the default run config with ``changes`` (None deletes a key); training itself is stubbed out,
    so a check that fails to fire shows as "reached training", never as a training run."""
    reached = []
    monkeypatch.setattr(cli, "_train", lambda run, kwargs, lomo: reached.append((run, kwargs)) or 0)

    def call(*overrides, **changes):
        values = {**DEFAULT, "output_dir": str(tmp_path / "out"), **changes}
        run = tmp_path / "run.json"
        run.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
        rc = cli.main([str(run), *overrides])
        assert not torch.distributed.is_initialized(), "a start-up check must come before any process group"
        return rc, capsys.readouterr().err.strip(), reached
    return call


def refused(lomo_train, match, *overrides, **changes):
    rc, err, reached = lomo_train(*overrides, **changes)
    assert not reached, "reached training"
    assert rc == 2, err
    assert err.startswith("lomo-train: error: ") and "\n" not in err, err
    assert re.search(match, err), err
    return err


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


@pytest.mark.parametrize("overrides, changes, match", [
    ((), {"learning_rate": "fast"}, r"run.json: learning_rate=\"fast\" must be a number$"),
    ((), {"seed": "auto"}, r"run.json: seed=\"auto\" must be an integer$"),
    ((), {"per_device_train_batch_size": 2.5}, r"per_device_train_batch_size=2.5 must be an integer$"),
    ((), {"max_length": -1}, r"max_length must be an integer >= 2 \(tokens per example\), got -1$"),
    ((), {"use_cpu": "yes"}, r"use_cpu=\"yes\" must be true or false$"),
    ((), {"eval_choices": " positive"}, r"eval_choices=\" positive\" must be a list of a string or null"),
    (("--learning_rate", "fast"), {}, r"--learning_rate/--learning-rate: invalid float value: 'fast'"),
    (("--fp16", "maybe"), {}, r"--fp16: Truthy value expected: got maybe"),
    (("--learning_rat", "-1"), {}, r"unknown command-line argument\(s\) \['--learning_rat', '-1'\]"),
    (("--learning_rate",), {}, r"--learning_rate.*expected one argument"),
    (("--clip_mode", "local"), {}, r"error: clip_mode='local': use \"auto\" .* \"global\" .* or \"per_param\""),
    (("--clip_grad_value", "-1"), {}, r"error: clip_grad_value must be > 0, got -1"),
    ((), {"clip_mode": 3}, r"run.json: clip_mode=3 must be a string or null$"),
    ((), {"lomo_config": '{"clip_mode": "per_param"}'}, r"lomo_config is no longer read: write its keys"),
])
def test_wrong_types_are_one_line(lomo_train, overrides, changes, match):
    err = refused(lomo_train, match, *overrides, **changes)
    assert "usage:" not in err


def test_lomo_arguments_on_the_command_line_and_in_the_run_config(lomo_train, tmp_path):
    """LOMOArguments are run-config keys and flags; against the DeepSpeed JSON's optimizer.params, one place."""
    rc, _, reached = lomo_train("--clip_mode", "per_param", clip_grad_value=0.5)
    assert rc == 0 and reached
    reached.clear()
    ds = write(tmp_path, "ds.json", json.dumps({**ZERO3, "optimizer": {"type": "LOMO", "params": {"clip_mode": "global"}}}))
    refused(lomo_train, r"error: clip_mode='per_param' but optimizer.params.clip_mode='global': one setting given in "
                        r"two places, keep one$", "--clip_mode", "per_param", deepspeed=ds)
    refused(lomo_train, r"error: stochastic_rounding needs bf16 weights", "--stochastic_rounding", "true")
    refused(lomo_train, r"max_consecutive_skips must be an integer >= 1, got 0", max_consecutive_skips=0)


def test_lora_block_on_the_command_line_and_in_the_run_config(lomo_train):
    """LOMO+LoRA's block: a JSON object in the run config, a JSON string on the command line; bad keys and values
    are one line naming them, from peft's and torch's own checks."""
    rc, _, reached = lomo_train("--lora", '{"r": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}')
    assert rc == 0 and reached
    reached.clear()
    refused(lomo_train, r"error: lora has unknown key\(s\) \['rank'\]: use peft LoraConfig fields", lora={"rank": 4})
    refused(lomo_train, r"error: lora must be a JSON object, got invalid JSON", "--lora", '{"r": 4')
    refused(lomo_train, r"error: lora.optimizer.type 'Muon': use an element-wise torch.optim class",
            lora={"optimizer": {"type": "Muon"}})
    refused(lomo_train, r"error: lora.optimizer.params: Invalid learning rate: -1",
            lora={"optimizer": {"type": "AdamW", "params": {"lr": -1}}})


def test_no_abbreviations(lomo_train):
    """--learning_rat used to be taken as --learning_rate; the same typo in the file was refused."""
    refused(lomo_train, r"unknown command-line argument\(s\) \['--learning_rat', '0.1'\]", "--learning_rat", "0.1")
    refused(lomo_train, r"run.json: unknown key\(s\) \['learning_rat'\]", learning_rat=0.1)


@pytest.mark.parametrize("content, match", [
    (None, r"DeepSpeed config '.*nope.json' does not exist"),
    ("", r"DeepSpeed config .*ds.json is empty"),
    ('{"zero_optimization": {"stage": 3},\n "optimizer": }', r"ds.json: invalid JSON at line 2 column 15"),
    ("[1, 2]", r"DeepSpeed config .*ds.json must be a JSON object \{...\}, got a list"),
    (json.dumps({**ZERO3, "gradient_accumulation_steps": "4"}), r"gradient_accumulation_steps must be an integer"),
    (json.dumps({**ZERO3, "zero_optimization": None}), r"zero_optimization must be a JSON object"),
    (json.dumps({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "lots"}}}),
     r"scheduler.params.warmup_num_steps must be an integer >= 0 or \"auto\", got 'lots'"),
    (json.dumps({**ZERO3, "train_micro_batch_size_per_gpu": 4}),
     r"train_micro_batch_size_per_gpu=4 but TrainingArguments.per_device_train_batch_size=32"),
])
def test_deepspeed_json_errors_at_start_up(lomo_train, tmp_path, content, match):
    path = str(tmp_path / "nope.json") if content is None else write(tmp_path, "ds.json", content)
    refused(lomo_train, match, deepspeed=path)


def test_fp16_on_a_device_deepspeed_refuses_stops_at_start_up(lomo_train, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)
    refused(lomo_train, r"error: fp16 is enabled but this device \(cpu\) has no fp16 support in DeepSpeed: "
                        r"use bf16 \(--bf16 true\) or fp32", "--fp16", "true")
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    rc, _, reached = lomo_train("--fp16", "true")
    assert rc == 0 and reached and reached[0][1]["fp16"] is True


def test_model_path_errors(lomo_train, tmp_path, monkeypatch):
    tiny = os.path.join(ROOT, "lomo_trainer", "assets", "tiny-llama")
    refused(lomo_train, r"model_name_or_path='\./no/such/model' does not exist: pass an existing local folder",
            model_name_or_path="./no/such/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(lomo_train, r"model_name_or_path='.*empty' is an empty folder", model_name_or_path=str(empty))
    (tmp_path / "noconfig").mkdir()
    write(tmp_path, "noconfig/tokenizer.json", "{}")
    refused(lomo_train, r"'.*noconfig' has no config.json", model_name_or_path=str(tmp_path / "noconfig"))
    refused(lomo_train, r"model_name_or_path='.*tiny-llama' has no weights \(model.safetensors / pytorch_model.bin\): "
                        r"pass a folder with weights, or init_from_scratch true", model_name_or_path=tiny,
            init_from_scratch=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(lomo_train, r"model_name_or_path='no-org/no-model' is not a local folder and HF_HUB_OFFLINE=1: "
                        r"it is not found locally", model_name_or_path="no-org/no-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a hub id goes through to from_pretrained
    rc, _, reached = lomo_train(model_name_or_path="no-org/no-model")
    assert rc == 0 and reached


def test_data_errors_at_start_up(lomo_train, tmp_path):
    good = [json.dumps({"prompt": f"review: {i}", "completion": " positive"}) for i in range(80)]
    refused(lomo_train, r"train_file='.*train.jsonl' is empty: it needs at least one example",
            train_file=write(tmp_path, "train.jsonl", ""))
    bad = list(good)
    bad[40] = '{"prompt": "review: x", "completion": '
    refused(lomo_train, r"train.jsonl' line 41: invalid JSON \(Expecting value at column 38\)",
            train_file=write(tmp_path, "train.jsonl", "\n".join(bad)))
    refused(lomo_train, r"validation_file='.*val.jsonl' line 2: no 'completion' \(fields: \['prompt'\]\)",
            validation_file=write(tmp_path, "val.jsonl", good[0] + '\n{"prompt": "x"}\n'))
    refused(lomo_train, r"train_file='.*missing.jsonl' does not exist", train_file=str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("given, expected", [
    (["--resume_from_checkpoint", "true"], True), (["--resume_from_checkpoint", "True"], True),
    (["--resume_from_checkpoint", "false"], None), ([], None), (["--resume_from_checkpoint", "ckpt/x"], "ckpt/x"),
])
def test_resume_true_means_latest_checkpoint(tmp_path, given, expected):
    run = write(tmp_path, "run.json", json.dumps({"model_name_or_path": "m", "output_dir": "o"}))
    assert cli.parse([run, *given])[1]["resume_from_checkpoint"] == expected


@pytest.mark.parametrize("value, expected", [(True, True), (False, None), ("true", True), ("out/checkpoint-2", "out/checkpoint-2")])
def test_resume_in_the_run_json(tmp_path, value, expected):
    run = write(tmp_path, "run.json", json.dumps({"model_name_or_path": "m", "resume_from_checkpoint": value}))
    assert cli.parse([run])[1]["resume_from_checkpoint"] == expected


def test_resume_from_a_missing_folder_is_refused_at_start_up(lomo_train, tmp_path):
    refused(lomo_train, r"resume_from_checkpoint='.*nowhere' does not exist: pass a checkpoint-N folder, or true",
            "--resume_from_checkpoint", str(tmp_path / "nowhere"))
