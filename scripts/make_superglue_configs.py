"""Write configs/superglue/<task>_<size>_8x3090.json (8 tasks x 4 LLaMA sizes) and their README.

Deterministic: the same files every run, so `git diff` after re-running shows nothing. Run from anywhere:

    python scripts/make_superglue_configs.py

The recipe is the LOMO paper's SuperGLUE one on 8 x RTX 3090 (24 GB): ZeRO-3 fp16 with dynamic loss scaling,
LOMO lr 0.03 (one value for every size and task), global batch 16 = 2 per GPU x 8, 10 epochs, linear
schedule with 10% warmup, global-norm clipping at 1.0, activation checkpointing, 1000 training and 1000
validation examples per task. The files differ only in the model and the output folder; they exist per
task so a task can be retuned alone.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "configs" / "superglue"
TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
SIZES = ("7b", "13b", "30b", "65b")


def run_config(task: str, size: str) -> dict:
    return {
        "model_name_or_path": f"huggyllama/llama-{size}",
        "max_length": 512,  # longer prompts lose their start; the answer is always kept
        "max_train_samples": 1000,  # SuperGLUE examples per task (superglue --n-train's default)
        "max_eval_samples": 1000,  # validation examples scored after training (--n-eval's default)
        # 65B sits at the edge of 24 GB: ZeRO-3 keeps fewer parameters gathered (1.3 GiB less per GPU)
        "deepspeed": "configs/zero3_fp16_lowmem.json" if size == "65b" else "configs/zero3_fp16.json",
        "output_dir": f"outputs/superglue/llama-{size}/{task}/lomo",
        "fp16": True,
        "gradient_checkpointing": True,  # the name transformers 5.17 and 5.23 both accept
        "per_device_train_batch_size": 2,  # x 8 GPUs = the paper's global batch of 16
        "per_device_eval_batch_size": 4,  # candidates scored per forward pass
        "learning_rate": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "num_train_epochs": 10,
        # no lr_scheduler_type: the DeepSpeed JSON's WarmupDecayLR block is the schedule's one home (linear warmup
        # over warmup_steps, then linear decay); lora drops that block and gets TrainingArguments' default, linear
        "warmup_steps": 0.1,  # < 1: a ratio of the total steps (transformers 5)
        "logging_steps": 10,
        "save_strategy": "no",  # the command evaluates in memory; checkpoints of 65B x 8 tasks are 1 TB
        "eval_strategy": "no",
        "report_to": ["tensorboard"],
        "seed": 42,
    }


TINY = {
    "model_name_or_path": "lomo_trainer/assets/tiny-llama",
    "init_from_scratch": True,
    "max_length": 128,
    "max_train_samples": 1000,
    "max_eval_samples": 1000,
    "deepspeed": "configs/zero3_cpu.json",
    "use_cpu": True,
    "output_dir": "outputs/superglue/tiny_cpu",
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 8,
    "learning_rate": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "num_train_epochs": 2,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 0,
}

README = """# SuperGLUE run configs

Written by `scripts/make_superglue_configs.py` (edit the script, not the files). Each file is a
`lomo-train` run config for `python -m lomo_trainer.superglue finetune|lora --config FILE --tasks TASK`;
`scripts/superglue_8gpu.sh SIZE` runs zero-shot, LoRA and LOMO over the eight tasks.

| file | what |
|---|---|
| `<task>_<size>_8x3090.json` | tasks boolq cb copa multirc record rte wic wsc, sizes 7b 13b 30b 65b (`huggyllama/llama-<size>`): the paper's LOMO recipe on 8 x RTX 3090 -- ZeRO-3 fp16 (`configs/zero3_fp16.json`; 65B: `configs/zero3_fp16_lowmem.json`), lr 0.03, batch 2 x 8 GPUs = 16, 10 epochs, linear schedule with 10% warmup (the DeepSpeed JSON's `WarmupDecayLR` block; `warmup_steps` 0.1, a ratio, fills its `"auto"` warmup), global-norm clipping 1.0, activation checkpointing, 1000 train / 1000 validation examples (`max_train_samples`/`max_eval_samples` count SuperGLUE examples here; CB, COPA and WSC have fewer training examples and use all) |
| `tiny_cpu.json` | the end-to-end test: shipped tiny LLaMA from scratch, ZeRO-3 on CPU (`configs/zero3_cpu.json`) |

`lora` reuses a LOMO config: it drops the DeepSpeed JSON's LOMO `optimizer` and `scheduler` blocks (HF's
AdamW and TrainingArguments' default linear schedule, with the same `warmup_steps`, run under the same ZeRO-3 fp16
set-up) and trains at `--lora-lr`
(5e-4 by default) instead of `learning_rate`. No training data keys (`train_file`, `dataset_name`): the
command writes `<output_dir>/<task>/{train,validation}.jsonl` from `--data-dir` or the hub.
"""


def dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for size in SIZES:
            dump(OUT / f"{task}_{size}_8x3090.json", run_config(task, size))
    dump(OUT / "tiny_cpu.json", TINY)
    (OUT / "README.md").write_text(README)
    print(f"wrote {len(TASKS) * len(SIZES) + 1} configs to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
