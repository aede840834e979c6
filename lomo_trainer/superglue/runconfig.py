"""A SuperGLUE run's settings: the run config with its overrides, sample sizes and the results header.

For ``zero-shot --model`` the run config is built from the flags."""
from __future__ import annotations

from pathlib import Path

from .runs import METHOD_LABELS

# zero-shot flags that write the run config of --model; with --config, RUN.json's field says it
MODEL_FLAGS = {"tokenizer": "tokenizer_name", "batch_size": "per_device_eval_batch_size", "max_length": "max_length",
               "dtype": "bf16 / fp16", "device": "use_cpu", "output_dir": "output_dir"}


def run_config(args, method: str):
    """RUN.json + overrides through lomo-train's parser; LOMO's DeepSpeed block is checked before any work."""
    from ..cli import parse, prevalidate

    if getattr(args, "model", None):
        return model_run_config(args)
    given = [flag for flag in MODEL_FLAGS if getattr(args, flag, None) is not None]
    if given:  # silently ignored, it would run with RUN.json's value instead
        raise ValueError(f"--{given[0].replace('_', '-')} goes with --model; with --config set "
                         f"{MODEL_FLAGS[given[0]]} in RUN.json or as --key value")
    run, targs_kwargs, lomo = parse([args.config, *args.overrides])
    for key in ("train_file", "validation_file", "dataset_name"):
        if getattr(run, key):
            raise ValueError(f"{args.config}: {key} is set, but SuperGLUE runs build their own data from "
                             "--data-dir or the hub; remove it.")
    block = lora_block(targs_kwargs, lomo)
    if method in ("lora", "lomo-lora") and block is None:
        raise ValueError(f"{args.config} has no lora block: use configs/superglue/<size>_{method.replace('-', '_')}"
                         "_8x3090.json, or add one with --lora '{\"r\": 8, ...}'")
    if method == "lomo" and block is not None:
        raise ValueError(f"{args.config} has a lora block: run finetune --method lomo-lora (LOMO + LoRA) or lora "
                         "(the LoRA baseline), or use a LOMO run config")
    if method == "lora":  # the block travels in lomo (runs.py builds the peft model from it)
        import dataclasses

        return run, lora_training_kwargs(targs_kwargs, block, args.config), dataclasses.replace(lomo, lora=block)
    if getattr(args, "optimizer", "lomo") == "adalomo":
        targs_kwargs, lomo = _adalomo(targs_kwargs, lomo)
    prevalidate(targs_kwargs, lomo)
    return run, targs_kwargs, lomo


def model_run_config(args):
    """``zero-shot --model``: the run config of one plain process per rank, without DeepSpeed (the model whole
    on each rank; under a launcher the ranks still share the scoring), in the dtype and on the device asked."""
    import torch
    from transformers import AutoConfig

    from ..cli import RunArguments, precheck_model
    from ..config import LOMOArguments

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    run = RunArguments(model_name_or_path=args.model, tokenizer_name=args.tokenizer)
    precheck_model(run)  # a missing folder reads as such, not as a hub error
    # the protocol's own max_length (paper: 1024) still wins in run_task, as with --config
    run.max_length = args.max_length or getattr(AutoConfig.from_pretrained(args.model), "max_position_embeddings",
                                                None) or run.max_length
    targs_kwargs = {"output_dir": args.output_dir or "superglue_results",
                    "per_device_eval_batch_size": args.batch_size or 8,
                    "use_cpu": args.device == "cpu" or not torch.cuda.is_available(),
                    "bf16": args.dtype == "bfloat16", "fp16": args.dtype == "float16",  # build_model's dtype
                    "report_to": "none", "save_strategy": "no"}  # wandb: once per run, by write_results
    return run, targs_kwargs, LOMOArguments()


def _adalomo(targs_kwargs: dict, lomo):
    """--optimizer adalomo: the DeepSpeed JSON's optimizer block becomes AdaLomo (its params kept)."""
    import dataclasses

    from ..config import load_json

    if targs_kwargs.get("deepspeed"):
        ds = load_json(targs_kwargs["deepspeed"])
        ds.setdefault("optimizer", {})["type"] = "AdaLomo"
        targs_kwargs = dict(targs_kwargs, deepspeed=ds)  # TrainingArguments takes a dict
    return targs_kwargs, dataclasses.replace(lomo, optimizer="adalomo")


def lora_block(targs_kwargs: dict, lomo) -> dict | None:
    """The run's lora block (run config, command line or DeepSpeed JSON; validate makes two of them agree)."""
    from ..config import load_json

    if lomo.lora is not None:
        return lomo.lora
    ds = targs_kwargs.get("deepspeed")
    return (load_json(ds) if ds else {}).get("lora")


def lora_training_kwargs(targs_kwargs: dict, block: dict, config: str) -> dict:
    """The LoRA baseline trains with the stock Trainer's AdamW at learning_rate (the lora block has no optimizer
    of its own here): the DeepSpeed JSON (if any) loses its LOMO optimizer, scheduler and lora blocks, so
    DeepSpeed wraps HF's AdamW and TrainingArguments' schedule."""
    from ..config import load_json

    if "optimizer" in block:
        raise ValueError(f"{config}: lora.optimizer is LOMO+LoRA's adapter optimizer; the LoRA baseline trains with the "
                         "stock Trainer's AdamW at learning_rate: remove it (configs/superglue/<size>_lora_8x3090.json)")
    kwargs = dict(targs_kwargs)
    if kwargs.get("deepspeed"):
        ds = dict(load_json(kwargs["deepspeed"]))
        if ds.get("optimizer", {}).get("type", "LOMO") != "LOMO":
            raise ValueError(f"{kwargs['deepspeed']}: optimizer.type {ds['optimizer']['type']!r}; lora expects "
                             "a LOMO run config's DeepSpeed JSON (its LOMO block is dropped) or --deepspeed ''.")
        for key in ("optimizer", "scheduler", "lora"):
            ds.pop(key, None)
        kwargs["deepspeed"] = ds  # TrainingArguments takes a dict
    return kwargs


def _size(flag, configured):
    """None means every example."""
    n = flag if flag is not None else configured if configured is not None else 1000
    return None if n < 0 else n


def sample_sizes(args, run, method: str):
    if method == "zero-shot":
        return 0, _size(getattr(args, "n", None), run.max_eval_samples)
    return _size(args.n_train, run.max_train_samples), _size(args.n_eval, run.max_eval_samples)


def results_header(args, run, targs_kwargs, lomo, method, n_train, n_eval) -> dict:
    label = "AdaLomo" if method == "lomo" and getattr(args, "optimizer", "lomo") == "adalomo" else METHOD_LABELS[method]
    label += "" if args.protocol == "standard" else f" ({args.protocol})"
    split = getattr(args, "split", "validation")
    results = {"name": args.name or f"{Path(run.model_name_or_path.rstrip('/')).name} {label}",
               "model": run.model_name_or_path, "method": method, "protocol": args.protocol,
               "split": "validation" if split == "val" else split, "normalize": args.normalize, "n": n_eval,
               "n_train": n_train, "seed": args.sample_seed, "data": args.data_dir or args.hub_repo,
               "config": args.config,  # None for zero-shot --model
               "learning_rate": None if method == "zero-shot" else targs_kwargs["learning_rate"], "tasks": {}}
    if method in ("lora", "lomo-lora"):
        from ..lora_config import check_block

        block = check_block(lora_block(targs_kwargs, lomo))
        results["lora"] = {**block["config"], "lr": block["optimizer"]["params"].get("lr") if method == "lomo-lora"
                           else targs_kwargs["learning_rate"]}
    return results
