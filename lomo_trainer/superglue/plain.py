"""``zero-shot --model``: a model loaded whole on each rank (no DeepSpeed), evaluated once per task."""
from __future__ import annotations

from pathlib import Path

from .evaluation import evaluate, task_metrics
from .protocols import get_protocol
from .report import write_results
from .runs import load_examples
from .runtime import setup_distributed
from .training import select


def zero_shot_plain(args, names: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proto = get_protocol(args.protocol)
    device, rank = setup_distributed(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    n = 1000 if args.n is None else None if args.n < 0 else args.n
    label = "" if proto.name == "standard" else f" ({proto.name})"
    results = {"name": args.name or Path(args.model.rstrip("/")).name + label, "model": args.model,
               "method": "zero-shot", "protocol": proto.name, "split": "validation" if args.split == "val" else args.split,
               "normalize": args.normalize, "n": n, "seed": args.sample_seed, "data": args.data_dir or args.hub_repo,
               "tasks": {}}
    for name in names:
        examples = load_examples(name, args.split, n, args)
        r = evaluate(model, tokenizer, name, examples, args.normalize, protocol=proto.name, batch_size=args.batch_size,
                     max_length=args.max_length, device=device)
        results["tasks"][name] = select([{**r, "epoch": 0.0, "step": 0}], task_metrics(name, proto.name), "last")
    if rank == 0:
        write_results(results, Path(args.output_dir), wandb=args.report_to == "wandb",
                      wandb_project=args.wandb_project, show=True, log=True)
    return results
