"""``python -m lomo_trainer.superglue``: zero-shot evaluation, LOMO / LoRA fine-tuning, results tables.

    python -m lomo_trainer.superglue zero-shot --model PATH [--tasks cb,copa] [--data-dir DIR] [--n 1000]
    python -m lomo_trainer.superglue zero-shot --config RUN.json [...]     # sharded as RUN.json says (ZeRO-3)
    python -m lomo_trainer.superglue finetune --config RUN.json [--tasks cb,copa] [--key value ...]
    python -m lomo_trainer.superglue finetune --method lomo-lora --config RUN.json [...]   # LOMO + LoRA
    python -m lomo_trainer.superglue lora --config RUN.json [--key value ...]          # the peft LoRA baseline
    python -m lomo_trainer.superglue table RESULTS.json [MORE.json ...] [--output TABLE.md]

Every command but ``table`` takes ``--protocol standard|paper`` (``protocols.py``). A plain process is a world
of one; under ``torchrun``/``deepspeed`` every rank scores a share of the candidates and rank 0 writes
``results.json``/``results.md``. ``finetune``/``lora`` train a fresh model per task on ``--n-train`` seeded
training examples and evaluate ``--n-eval`` seeded validation examples after every epoch; results keep the
best and the last epoch. ``zero-shot`` is the same path with zero epochs: ``--config`` builds the model as
RUN.json says, ``--model`` as a run config written from its flags (no DeepSpeed: the model whole on each
rank). ``RUN.json`` is a ``lomo-train`` run config (``configs/superglue/``); unknown ``--key value`` arguments
override its fields.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import ranks
from ..ranking import NORMALIZATIONS
from .protocols import PROTOCOLS, check_tasks, get_protocol
from .report import load_json, merge_runs, render_table, write_results
from .tasks import TASKS, get_task

OVERRIDES = ("Any other --key value overrides a field of RUN.json (RunArguments or TrainingArguments names, "
             "e.g. --learning_rate 0.01 --output_dir DIR), as in lomo-train.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lomo_trainer.superglue", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zero-shot", help="evaluate a causal LM by ranking candidate answers", epilog=OVERRIDES)
    source = z.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model path or hub id, loaded whole on each rank (no DeepSpeed)")
    source.add_argument("--config", help="run config: the model sharded as its DeepSpeed JSON says")
    # --model only (its run config); with --config, RUN.json's fields say these
    z.add_argument("--tokenizer", help="tokenizer path (default: --model)")
    z.add_argument("--split", default="validation", choices=("train", "validation", "val"))
    z.add_argument("--n", "--n-eval", dest="n", type=int,
                   help="examples per task, drawn with --sample-seed (default 1000; -1: all)")
    z.add_argument("--n-train", type=int, help=argparse.SUPPRESS)  # ignored: lets one flag set serve every method
    z.add_argument("--batch-size", type=int, help="candidates per forward pass (default 8)")
    z.add_argument("--max-length", type=int, help="tokens per sequence under --protocol standard (default: the "
                   "model's max_position_embeddings; paper: always its code's 1024)")
    z.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default float32")
    z.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda (this rank's GPU) when available")
    z.add_argument("--output-dir", help="default: superglue_results")
    _add_common(z)
    for name, help_ in (("finetune", "fine-tune every parameter with LOMO (LOMOTrainer; --method lomo-lora: with "
                                     "LoRA adapters too), then evaluate"),
                        ("lora", "fine-tune LoRA adapters (peft, stock Trainer + AdamW), then evaluate")):
        _add_train_args(sub.add_parser(name, help=help_, allow_abbrev=False, epilog=OVERRIDES), lora=name == "lora")
    t = sub.add_parser("table", help="render results JSON files as one markdown table")
    t.add_argument("results", nargs="+", help="results.json files; files of one run name and protocol with "
                   "different tasks share a row (e.g. one finetune command per task)")
    t.add_argument("--output", help="also write the table here")
    return p


def _add_common(p) -> None:
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: the protocol's)")
    p.add_argument("--protocol", default="standard", choices=tuple(PROTOCOLS),
                   help="standard: our prompts and SuperGLUE's metrics; paper: the LOMO paper's code exactly")
    p.add_argument("--data-dir", help="SuperGLUE release folder with <Task>/{train,val}.jsonl (default: the hub)")
    p.add_argument("--hub-repo", default="super_glue", help="hub dataset with the super_glue schema, e.g. aps/super_glue")
    p.add_argument("--sample-seed", "--seed", type=int, default=0, help="seed of the subsamples")
    p.add_argument("--normalize", default="sum", choices=NORMALIZATIONS, help="candidate score (paper: sum only)")
    p.add_argument("--name", help="run name in the table and on wandb")
    p.add_argument("--report-to", default="none", choices=("none", "wandb"), help="log the results table")
    p.add_argument("--wandb-project", help="default: $WANDB_PROJECT or lomo-superglue")


def _add_train_args(p: argparse.ArgumentParser, lora: bool) -> None:
    """Flags of ``finetune`` and ``lora`` (a new training flag, e.g. --optimizer, goes here and into
    ``runs.run_task``); anything else is a ``--key value`` override of RUN.json."""
    p.add_argument("--config", required=True, help="run config JSON (configs/superglue/<size>_lomo_8x3090.json)")
    p.add_argument("--n-train", type=int, help="training examples per task (default: the config's "
                                               "max_train_samples, else 1000; -1: all)")
    p.add_argument("--n-eval", type=int, help="validation examples per task (default: the config's "
                                              "max_eval_samples, else 1000; -1: all)")
    _add_common(p)
    if not lora:
        p.add_argument("--optimizer", choices=("lomo", "adalomo"), default="lomo",
                       help="adalomo: AdaLomo instead of LOMO's SGD (the run config's LOMO block becomes AdaLomo)")
        p.add_argument("--method", choices=("lomo", "lomo-lora"), default="lomo",
                       help="lomo-lora: LOMO on the base weights and the run config's lora block's adapters, one "
                            "backward (configs/superglue/<size>_lomo_lora_8x3090.json)")


def zero_shot(args) -> dict:
    return run_tasks(args, "zero-shot")  # one path with finetune: the model is built, no step is taken


def finetune(args) -> dict:
    return run_tasks(args, args.method)


def lora(args) -> dict:
    return run_tasks(args, "lora")


def run_tasks(args, method: str) -> dict:
    """Per task: fresh model, train, evaluate every epoch on every rank; rank 0 rewrites the results each task."""
    from .runconfig import results_header, run_config, sample_sizes
    from .runs import load_examples, run_task
    from .runtime import single_process_env

    names = _task_names(args)
    run, targs_kwargs, lomo = run_config(args, method)
    single_process_env()  # after the checks: bad input fails before any process group exists
    n_train, n_eval = sample_sizes(args, run, method)
    results = results_header(args, run, targs_kwargs, lomo, method, n_train, n_eval)
    rank = 0
    for name in names:
        split = getattr(args, "split", "validation")
        eval_ex = load_examples(name, split, n_eval, args)
        train_ex = eval_ex[:1] if method == "zero-shot" else load_examples(name, "train", n_train, args)
        results["tasks"][name], rank = run_task(name, train_ex, eval_ex, run, targs_kwargs, method, args, lomo)
        if rank == 0:  # after every task: a crash later keeps the finished ones
            write_results(results, Path(targs_kwargs["output_dir"]), log=True)
    if rank == 0:
        write_results(results, Path(targs_kwargs["output_dir"]), wandb=args.report_to == "wandb",
                      wandb_project=args.wandb_project, show=True)
    return results


def _task_names(args) -> list[str]:
    proto = get_protocol(args.protocol)
    given = [get_task(n.strip()).name for n in args.tasks.split(",") if n.strip()]
    if args.tasks == ",".join(TASKS):  # the default: every task the protocol has
        given = [n for n in given if n in proto.tasks]
    check_tasks(proto, given)
    return given


def table(args) -> str:
    md = render_table(merge_runs([load_json(path) for path in args.results]))
    if args.output:
        Path(args.output).write_text(md)
    print(md, end="")
    return md


COMMANDS = {"zero-shot": zero_shot, "finetune": finetune, "lora": lora, "table": table}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it; env has it
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "config", None):
        build_parser().parse_args(argv)  # the usual argparse error for unknown arguments
    args.overrides = rest
    created_here = not ranks.initialized()  # a caller's process group (a test) is the caller's to end
    try:
        result = COMMANDS[args.command](args)
        ranks.leave(created_here)
        return result
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
