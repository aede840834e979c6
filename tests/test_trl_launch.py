"""Launch paths in fresh processes: ``accelerate launch`` with the DeepSpeed config only in accelerate's YAML
(2 CPU ranks: trains under ZeRO-3, saves, resumes bitwise), and the TRL examples as plain ``python`` processes with a
ZeRO-3 JSON (a world of one, no launcher)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHERS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS and not k.startswith("ACCELERATE_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")]))
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
def test_accelerate_launch_with_the_deepspeed_config_only_in_its_yaml(tmp_path):
    from lomo_trainer.local_ranks import _free_port

    yaml = tmp_path / "accelerate.yaml"
    yaml.write_text(f"""compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ROOT}/configs/zero3_cpu.json
  zero3_init_flag: true
machine_rank: 0
main_training_function: main
num_machines: 1
num_processes: 2
use_cpu: true
""")
    launch = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file", str(yaml)]
    script = os.path.join(HERE, "accelerate_train.py")
    # 4 steps in one go, saving at 2 and 4; then steps 3-4 again, resumed from the first run's checkpoint-2
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    log = _run(launch + ["--main_process_port", str(_free_port()), script, str(whole), "4"], tmp_path)
    assert "LOMO_SOURCE accelerate's DeepSpeed plugin" in log
    _run(launch + ["--main_process_port", str(_free_port()), script, str(resumed), "4",
                   str(whole / "checkpoint-2")], tmp_path)
    a, b = _tensors(whole / "final"), _tensors(resumed / "final")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming"
    start = _tensors(whole / "checkpoint-2")
    assert any(not torch.equal(start[n], a[n]) for n in a), "steps 3-4 changed the weights"
    state = json.load(open(resumed / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4
    losses = [{h["step"]: h["loss"] for h in json.load(open(d / "checkpoint-4" / "trainer_state.json"))["log_history"]
               if "loss" in h} for d in (whole, resumed)]
    assert losses[1] and all(losses[0][s] == loss for s, loss in losses[1].items()), losses


def _tiny_model(folder):
    from models import tiny_llama, word_tokenizer

    from test_trl import WORDS

    tokenizer, _ = word_tokenizer(WORDS)
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["trl_sft", "trl_dpo"])
def test_trl_example_as_a_plain_process_with_a_zero3_json(tmp_path, example):
    from test_trl import dpo_rows, sft_rows

    _tiny_model(tmp_path / "model")
    rows = sft_rows(16) if example == "trl_sft" else dpo_rows(16)
    rows.to_json(str(tmp_path / "data.jsonl"))
    out = tmp_path / "out"
    _run([sys.executable, os.path.join(ROOT, "examples", f"{example}.py"), "--model_name_or_path",
          str(tmp_path / "model"), "--dataset_name", "json", "--data_files", str(tmp_path / "data.jsonl"),
          "--deepspeed", os.path.join(ROOT, "configs", "zero3_cpu.json"), "--use_cpu", "--bf16", "false",
          "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate",
          "0.05", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--max_length", "32",
          "--disable_tqdm", "true"], tmp_path)
    before, after = _tensors(tmp_path / "model"), _tensors(out)
    assert any(not torch.equal(before[n], after[n]) for n in before), "the weights did not change"
    assert all(torch.isfinite(t).all() for t in after.values())
