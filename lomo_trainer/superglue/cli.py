"""``python -m lomo_trainer.superglue``: zero-shot evaluation and results tables.

    python -m lomo_trainer.superglue zero-shot --model PATH [--tasks cb,copa] [--data-dir DIR] [--n 1000]
        [--normalize sum|token|char] [--output-dir DIR] [--report-to wandb]
    python -m lomo_trainer.superglue table RESULTS.json [MORE.json ...] [--output TABLE.md]

``zero-shot`` writes ``results.json`` and ``results.md`` to ``--output-dir``. Under ``torchrun`` every rank
loads the model and scores a share of the candidates; rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..ranking import NORMALIZATIONS
from .report import load_json, log_wandb, render_table, save_json
from .tasks import TASKS, get_task

DTYPES = ("float32", "bfloat16", "float16")


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

    t = sub.add_parser("table", help="render results JSON files as one markdown table")
    t.add_argument("results", nargs="+", help="results.json files, one row each")
    t.add_argument("--output", help="also write the table here")
    return p


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


def table(args) -> str:
    md = render_table([load_json(path) for path in args.results])
    if args.output:
        Path(args.output).write_text(md)
    print(md, end="")
    return md


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return {"zero-shot": zero_shot, "table": table}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
