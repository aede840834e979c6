"""The Trainer contract as an HF script uses it (tests/hf_style_clm.py, shaped as transformers' run_clm.py), with
only the class swapped: train, resume from the last checkpoint, save_model/log_metrics/save_metrics/save_state,
evaluate with compute_metrics and preprocess_logits_for_metrics, create_model_card. On 1 process and on 2 ranks
(LOMOTrainer under ZeRO-3 there), against the stock Trainer on the same arguments."""
import json
import os

import pytest

from distributed import run_ranks

ARGS = ["--do_train", "--do_eval", "--use_cpu", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size",
        "4", "--learning_rate", "0.1", "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps",
        "3", "--eval_strategy", "steps", "--eval_steps", "3", "--logging_steps", "1", "--report_to", "none",
        "--seed", "0", "--optim", "sgd", "--max_grad_norm", "0", "--disable_tqdm", "true", "--save_total_limit", "1"]
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3},
         "optimizer": {"type": "LOMO", "params": {"lr": "auto"}}}


def script(rank, world, out, lomo, max_steps, deepspeed=None):
    from transformers import Trainer

    from hf_style_clm import main
    from lomo_trainer import LOMOTrainer

    argv = ["--output_dir", out, "--max_steps", str(max_steps), *ARGS] + (["--deepspeed", deepspeed] if deepspeed else [])
    results = main(argv, LOMOTrainer if lomo else Trainer)
    files = sorted(f for f in os.listdir(out) if f.endswith(".json") or f == "README.md")
    return results, files


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2])
def test_hf_script_with_the_class_swapped(tmp_path, world):
    deepspeed = None
    if world == 2:
        deepspeed = str(tmp_path / "zero3.json")
        json.dump(ZERO3, open(deepspeed, "w"))
    stock, stock_files = run_ranks(script, world, str(tmp_path / "stock"), False, 6)[0]
    # LOMO: 3 steps, then the same command with 6 resumes from checkpoint-3 (found by get_last_checkpoint)
    run_ranks(script, world, str(tmp_path / "lomo"), True, 3, deepspeed)
    ours, files = run_ranks(script, world, str(tmp_path / "lomo"), True, 6, deepspeed)[0]

    assert files == stock_files, (files, stock_files)
    for split in ("train", "eval"):
        assert set(stock[split]) <= set(ours[split]), (split, set(stock[split]) - set(ours[split]))
    # the same SGD on the same data: the same held-out loss and next-token accuracy
    assert ours["eval"]["eval_loss"] == pytest.approx(stock["eval"]["eval_loss"], rel=1e-5)
    assert ours["eval"]["eval_accuracy"] == pytest.approx(stock["eval"]["eval_accuracy"], abs=1e-6)
    state = json.load(open(tmp_path / "lomo" / "trainer_state.json"))
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"] if "eval_loss" in h] == [3, 6]
    # resumed, not restarted: this call's train_loss averages steps 4-6 only (as the stock Trainer reports it)
    stock_state = json.load(open(tmp_path / "stock" / "trainer_state.json"))
    losses = {h["step"]: h["loss"] for h in stock_state["log_history"] if "loss" in h}
    assert ours["train"]["train_loss"] == pytest.approx(sum(losses[s] for s in (4, 5, 6)) / 3, rel=1e-4)
    assert ours["train"]["train_loss"] != pytest.approx(sum(losses.values()) / 6, rel=1e-4)
    assert "LOMO" in open(tmp_path / "lomo" / "README.md").read()
