"""``python -m lomo_trainer.superglue``: zero-shot evaluation, LOMO / LoRA fine-tuning, results tables.

    python -m lomo_trainer.superglue zero-shot --model PATH [--tasks cb,copa] [--data-dir DIR] [--n 1000]
        [--normalize sum|token|char] [--output-dir DIR] [--report-to wandb]
    python -m lomo_trainer.superglue finetune --config RUN.json [--tasks cb,copa] [--data-dir DIR]
        [--n-train 1000] [--n-eval 1000] [--report-to wandb] [--key value ...]
    python -m lomo_trainer.superglue lora --config RUN.json [--lora-r 8 --lora-lr 5e-4 ...] [--key value ...]
    python -m lomo_trainer.superglue table RESULTS.json [MORE.json ...] [--output TABLE.md]

``zero-shot`` writes ``results.json`` and ``results.md`` to ``--output-dir``. Under ``torchrun`` every rank
loads the model and scores a share of the candidates; rank 0 writes the files.

``finetune`` (LOMO, ``LOMOTrainer``) and ``lora`` (peft LoRA with the stock ``transformers.Trainer`` and
AdamW) share one path: per task, a fresh model is trained on ``--n-train`` seeded training examples and
evaluated on ``--n-eval`` seeded validation examples (the same ones ``zero-shot --n`` draws with the same
seed), then ``results.json``/``results.md`` go to the run config's ``output_dir`` in ``zero-shot``'s schema.
``RUN.json`` is a ``lomo-train`` run config (``configs/superglue/``); unknown ``--key value`` arguments
override its fields. Its ``max_train_samples``/``max_eval_samples`` are the defaults of ``--n-train``/
``--n-eval`` (SuperGLUE examples, not training records). Works under ``deepspeed --num_gpus N`` too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import _hf
from ..ranking import NORMALIZATIONS
from .report import load_json, log_wandb, render_table, run_name, save_json
from .tasks import TASKS, get_task

DTYPES = ("float32", "bfloat16", "float16")
OVERRIDES = ("Any other --key value overrides a field of RUN.json (RunArguments or TrainingArguments names, "
             "e.g. --learning_rate 0.01 --output_dir DIR), as in lomo-train.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lomo_trainer.superglue", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zero-shot", help="evaluate a causal LM by ranking candidate answers")
    z.add_argument("--model", required=True, help="model path or hub id (AutoModelForCausalLM)")
    z.add_argument("--tokenizer", help="tokenizer path (default: --model)")
    z.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all eight)")
    z.add_argument("--data-dir", help="SuperGLUE release folder with <Task>/{train,val}.jsonl (default: the hub)")
    z.add_argument("--hub-repo", default="super_glue", help="hub dataset with the super_glue schema, e.g. aps/super_glue")
    z.add_argument("--split", default="validation", choices=("train", "validation", "val"))
    z.add_argument("--n", type=int, default=1000, help="examples per task, drawn with --seed (default 1000; -1: all)")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--normalize", default="sum", choices=NORMALIZATIONS, help="candidate score: summed log-likelihood, per token, per character")
    z.add_argument("--batch-size", type=int, default=8)
    z.add_argument("--max-length", type=int, help="tokens per sequence (default: the model's max_position_embeddings)")
    z.add_argument("--dtype", default="float32", choices=DTYPES)
    z.add_argument("--device", help="default: cuda (this rank's) when available, else cpu")
    z.add_argument("--name", help="run name in the table and on wandb (default: the model folder's name)")
    z.add_argument("--output-dir", default="superglue_results")
    z.add_argument("--report-to", default="none", choices=("none", "wandb"))
    z.add_argument("--wandb-project", help="default: $WANDB_PROJECT or lomo-superglue")

    for name, help_ in (("finetune", "fine-tune every parameter with LOMO (LOMOTrainer), then evaluate"),
                        ("lora", "fine-tune LoRA adapters (peft, stock Trainer + AdamW), then evaluate")):
        _add_train_args(sub.add_parser(name, help=help_, allow_abbrev=False, epilog=OVERRIDES), lora=name == "lora")

    t = sub.add_parser("table", help="render results JSON files as one markdown table")
    t.add_argument("results", nargs="+", help="results.json files; files of one run name with different tasks "
                   "share a row (e.g. one finetune command per task)")
    t.add_argument("--output", help="also write the table here")
    return p


def _add_train_args(p: argparse.ArgumentParser, lora: bool) -> None:
    """Flags of ``finetune`` and ``lora``; anything else is a ``--key value`` override of RUN.json."""
    p.add_argument("--config", required=True, help="run config JSON (configs/superglue/<task>_<size>_8x3090.json)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all eight)")
    p.add_argument("--data-dir", help="SuperGLUE release folder with <Task>/{train,val}.jsonl (default: the hub)")
    p.add_argument("--hub-repo", default="super_glue", help="hub dataset with the super_glue schema")
    p.add_argument("--n-train", type=int, help="training examples per task (default: the config's "
                                               "max_train_samples, else 1000; -1: all)")
    p.add_argument("--n-eval", type=int, help="validation examples per task (default: the config's "
                                              "max_eval_samples, else 1000; -1: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of both subsamples (zero-shot's --seed)")
    p.add_argument("--normalize", default="sum", choices=NORMALIZATIONS)
    p.add_argument("--name", help="run name in the table and on wandb (default: '<model> LOMO' / '<model> LoRA')")
    p.add_argument("--report-to", default="none", choices=("none", "wandb"), help="log the results table "
                   "(training metrics follow the config's report_to)")
    p.add_argument("--wandb-project", help="default: $WANDB_PROJECT or lomo-superglue")
    if not lora:
        p.add_argument("--no-train", action="store_true", help="evaluate the model as loaded, sharded as the "
                       "config says: zero-shot of models too big for one GPU (method 'zero-shot')")
    else:
        p.add_argument("--lora-r", type=int, default=8)
        p.add_argument("--lora-alpha", type=int, default=16)
        p.add_argument("--lora-dropout", type=float, default=0.05)
        p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names")
        p.add_argument("--lora-lr", type=float, default=5e-4,
                       help="AdamW learning rate; replaces the config's (LOMO's) learning_rate")


def _setup_distributed(device_arg):
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, (dist.get_rank() if dist.is_initialized() else 0)


def zero_shot(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate
    from .loading import load_task

    tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    device, rank = _setup_distributed(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    n = None if args.n is not None and args.n < 0 else args.n
    results = {"name": args.name or Path(args.model.rstrip("/")).name, "model": args.model, "method": "zero-shot",
               "split": "validation" if args.split == "val" else args.split, "normalize": args.normalize,
               "n": n, "seed": args.seed, "data": args.data_dir or args.hub_repo, "tasks": {}}
    for t in tasks:
        examples = load_task(t.name, args.split, args.data_dir, n=n, seed=args.seed, hub_repo=args.hub_repo)
        results["tasks"][t.name] = evaluate(model, tokenizer, t.name, examples, args.normalize,
                                            batch_size=args.batch_size, max_length=args.max_length, device=device)
        if rank == 0:
            print(f"{t.dirname}: " + ", ".join(f"{k}={v:.4f}" for k, v in results["tasks"][t.name].items()
                                              if isinstance(v, float)), flush=True)
    if rank == 0:
        table = render_table([results])
        out = Path(args.output_dir)
        save_json(results, out / "results.json")
        (out / "results.md").write_text(table)
        print(table)
        if args.report_to == "wandb":
            log_wandb(results, args.wandb_project, table)
    return results


def finetune(args) -> dict:
    if args.no_train:  # LOMOTrainer over zero epochs: the ZeRO-3 engine is built, no step is taken
        args.overrides = [*args.overrides, "--num_train_epochs", "0", "--max_steps", "-1"]
        return train_tasks(args, method="zero-shot")
    return train_tasks(args, method="lomo")


def lora(args) -> dict:
    return train_tasks(args, method="lora")


TRAIN_COMMANDS = {"finetune": finetune, "lora": lora}
METHOD_LABELS = {"lomo": "LOMO", "lora": "LoRA", "zero-shot": "zero-shot"}


def train_tasks(args, method: str) -> dict:
    """Per task: fresh model, train, evaluate on every rank; rank 0 rewrites the results after each task."""
    run, targs_kwargs, lomo = _run_config(args, method)
    tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    n_train = _sample_size(args.n_train, run.max_train_samples)
    n_eval = _sample_size(args.n_eval, run.max_eval_samples)
    root = Path(targs_kwargs["output_dir"])
    results = {"name": args.name or f"{Path(run.model_name_or_path.rstrip('/')).name} {METHOD_LABELS[method]}",
               "model": run.model_name_or_path, "method": method, "split": "validation",
               "normalize": args.normalize, "n": n_eval, "n_train": n_train, "seed": args.sample_seed,
               "data": args.data_dir or args.hub_repo, "config": args.config,
               "learning_rate": targs_kwargs["learning_rate"], "tasks": {}}
    if method == "lora":
        results["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                           "targets": _lora_targets(args), "lr": args.lora_lr}
    rank = 0
    for t in tasks:
        train_ex = _load(args, t.name, "train", n_train)
        eval_ex = _load(args, t.name, "validation", n_eval)
        metrics, rank = _train_and_evaluate(t, train_ex, eval_ex, run, targs_kwargs, args, method, lomo)
        results["tasks"][t.name] = metrics
        if rank == 0:
            print(f"{t.dirname} ({method}): " + ", ".join(f"{k}={v:.4f}" for k, v in results["tasks"][t.name].items()
                                                           if isinstance(v, float)), flush=True)
            _write_results(results, root)  # after every task: a crash later keeps the finished ones
    if rank == 0:
        print(render_table([results]))
        if args.report_to == "wandb":
            log_wandb(results, args.wandb_project, render_table([results]))
    return results


def _run_config(args, method: str):
    """RUN.json + overrides through lomo-train's parser; LOMO's DeepSpeed block is checked before any work."""
    from ..cli import parse, prevalidate

    run, targs_kwargs, lomo = parse([args.config, *args.overrides])
    for key in ("train_file", "validation_file", "dataset_name"):
        if getattr(run, key):
            raise ValueError(f"{args.config}: {key} is set, but SuperGLUE runs build their own data from "
                             "--data-dir or the hub; remove it.")
    if method != "lora":
        prevalidate(targs_kwargs, lomo)
    else:
        targs_kwargs = _lora_training_kwargs(targs_kwargs, args)
    return run, targs_kwargs, lomo


def _sample_size(flag: int | None, configured: int | None) -> int | None:
    """None means every example."""
    n = flag if flag is not None else configured if configured is not None else 1000
    return None if n < 0 else n


def _load(args, task: str, split: str, n: int | None) -> list[dict]:
    from .loading import load_task

    return load_task(task, split, args.data_dir, n=n, seed=args.sample_seed, hub_repo=args.hub_repo)


def _lora_targets(args) -> list[str]:
    return [m.strip() for m in args.lora_targets.split(",") if m.strip()]


def _lora_training_kwargs(targs_kwargs: dict, args) -> dict:
    """LoRA trains with the stock Trainer's AdamW at --lora-lr: the DeepSpeed JSON (if any) loses its LOMO
    optimizer and its scheduler blocks, so DeepSpeed wraps HF's AdamW and TrainingArguments' schedule."""
    from ..config import load_json

    kwargs = dict(targs_kwargs, learning_rate=args.lora_lr)
    if kwargs.get("deepspeed"):
        ds = dict(load_json(kwargs["deepspeed"]))
        if ds.get("optimizer", {}).get("type", "LOMO") != "LOMO":
            raise ValueError(f"{kwargs['deepspeed']}: optimizer.type {ds['optimizer']['type']!r}; lora expects "
                             "a LOMO run config's DeepSpeed JSON (its LOMO block is dropped) or --deepspeed ''.")
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        kwargs["deepspeed"] = ds  # TrainingArguments takes a dict
    return kwargs


def _train_and_evaluate(task, train_ex, eval_ex, run, targs_kwargs, args, method, lomo=None):
    """One task on a fresh model; returns (metrics, rank). Every rank evaluates the same examples."""
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from ..data import build_datasets
    from .evaluation import evaluate

    _hf.reset_accelerate_state()  # a fresh engine per task
    targs = TrainingArguments(**{**targs_kwargs, "output_dir": str(Path(targs_kwargs["output_dir"]) / task.name)})
    set_seed(targs.seed)  # before the model: every task starts from the same initialisation
    train_file, eval_file = _write_records(task.name, train_ex, eval_ex, targs)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_name or run.model_name_or_path)
    data = build_datasets(tokenizer, train_file=train_file, validation_file=eval_file, max_length=run.max_length,
                          seed=targs.seed)
    model = _load_model(run, targs, method)
    trainer = (_lora_trainer if method == "lora" else _lomo_trainer)(model, targs, data, tokenizer, run, args, lomo)
    out = trainer.train()
    result = evaluate(trainer.model, tokenizer, task.name, eval_ex, args.normalize,
                      batch_size=targs.per_device_eval_batch_size, max_length=run.max_length, device=targs.device)
    result.update(train_loss=out.training_loss, train_steps=out.global_step, n_train=len(train_ex))
    rank = targs.process_index
    _release(trainer)
    del trainer, model
    _free_memory()
    return result, rank


def _release(trainer) -> None:
    """Unhook the task's engine and drop the trainer's references to it and the model."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.accelerator = None


def _free_memory() -> None:
    """Collect the released model (reference cycles) so the next task's fits on the GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_records(task: str, train_ex, eval_ex, targs) -> tuple[str, str]:
    """Prompt/completion jsonl for build_datasets: rank 0 writes, every rank waits at a barrier."""
    import torch.distributed as dist

    from .training import training_records

    folder = Path(targs.output_dir)
    paths = folder / "train.jsonl", folder / "validation.jsonl"
    if targs.process_index == 0:  # also sets the process group up (TrainingArguments does it lazily)
        folder.mkdir(parents=True, exist_ok=True)
        for path, examples in zip(paths, (train_ex, eval_ex)):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in training_records(task, examples))
    if dist.is_initialized():
        dist.barrier()
    return str(paths[0]), str(paths[1])


def _load_model(run, targs, method: str):
    """Created after TrainingArguments, so a ZeRO-3 config partitions it while loading (zero.Init)."""
    import torch

    from ..cli import build_model

    # amp keeps fp32 weights for LoRA without DeepSpeed: fp16 trainable LoRA weights cannot be unscaled
    return build_model(run, targs, dtype=torch.float32 if method == "lora" and not targs.deepspeed else None)


def _lomo_trainer(model, targs, data, tokenizer, run, args, lomo):
    from ..data import CausalLMCollator
    from ..trainer import LOMOTrainer

    return LOMOTrainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
                       data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer, lomo_args=lomo)


def _lora_trainer(model, targs, data, tokenizer, run, args, lomo=None):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from ..data import CausalLMCollator

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=_lora_targets(args), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if targs.process_index == 0:
        model.print_trainable_parameters()
    return Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
                   data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer)


def _write_results(results: dict, root: Path) -> None:
    save_json(results, root / "results.json")
    (root / "results.md").write_text(render_table([results]))


def table(args) -> str:
    md = render_table(merge_runs([load_json(path) for path in args.results]))
    if args.output:
        Path(args.output).write_text(md)
    print(md, end="")
    return md


def merge_runs(runs: list[dict]) -> list[dict]:
    """One row per run name where the files hold different tasks (one command per task); a file that
    repeats a task of its name's row starts a new row."""
    rows: list[dict] = []
    for run in runs:
        name = run_name(run)
        tasks = {get_task(t).name: m for t, m in run["tasks"].items()}
        row = next((r for r in rows if run_name(r) == name and not set(tasks) & set(r["tasks"])), None)
        if row is None:
            rows.append({**run, "name": name, "tasks": tasks})
        else:
            row["tasks"].update(tasks)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it; env has it
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in TRAIN_COMMANDS:
        build_parser().parse_args(argv)  # the usual argparse error for unknown arguments
    args.overrides = rest
    try:
        return {"zero-shot": zero_shot, "table": table, **TRAIN_COMMANDS}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
