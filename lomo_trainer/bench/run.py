"""Memory and speed of LOMO against DeepSpeed ZeRO-3 AdamW, SGD, the fwd+bwd floor and forward only.

    python -m lomo_trainer.bench --preset small --seq-len 256 --batch 2 --steps 3 --world-size 2 --out runs/bench
    python -m lomo_trainer.bench --preset qwen3-moe-small ...     # any preset, or --model-config of any HF causal LM

Every mode runs in fresh processes (one per rank; forked on CPU, spawned on CUDA so no rank inherits a CUDA
context), so peaks never mix. Writes OUT/bench.md (also printed), OUT/bench.json and OUT/bench.png.
Memory: on CUDA ``max_memory_allocated`` / ``max_memory_reserved``; on CPU peak RSS above the process's RSS
before the model was built (see bench/memstat.py). Each mode's peak sits next to the planner's prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import replace

from . import report as bench_report
from ..gathering import KEYS as GATHERING_KEYS
from ..gathering import fill_auto
from .inventory import Inventory, build_inventory
from .planner import DTYPE_BYTES, Setup, ZeroKnobs, breakdown
from .presets import PRESETS, load_config
from .worker import MODES

# step-time ratios reported with median and spread over --repeat rounds: (numerator, denominator, meaning)
RATIOS = (("lomo", "fwd_bwd_comm", "the update's own cost (target <= 1.05)"),
          ("lomo", "sgd", "LOMO against ZeRO-3 SGD (target <= 1)"),
          ("fwd_bwd_comm", "fwd_bwd", "what gradient communication costs"),
          ("lomo", "fwd_bwd", "LOMO over the floor"),
          ("lomo_clip", "fwd_bwd_comm", "global-norm clipping in two passes over one pass without an update "
           "(expected near 2)"),
          ("lomo_clip_buffered", "fwd_bwd_comm", "global-norm clipping in one pass through the buffer (expected "
           "within ~1.1)"),
          ("lomo_clip", "lomo_clip_buffered", "what the buffer saves: two-pass over one-pass clipping"))
from ..local_ranks import run_ranks


def _bench_rank(rank, world, mode, cfg):
    """One rank of one mode (the process group is up)."""
    from .memstat import tune_malloc

    tune_malloc()
    import torch

    from .. import _zero
    from . import worker as bench_worker

    _zero.disable_cpu_shm_build()
    context = None
    if cfg["device"] == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        # The CUDA context and NCCL's buffers (the process group is up) sit outside the caching allocator,
        # which is all set_per_process_memory_fraction caps: measure them and count them against the cap.
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)
        if cfg.get("memory_cap_gb"):  # stands for a smaller GPU (e.g. 24 GB RTX 3090) on a bigger one
            torch.cuda.set_per_process_memory_fraction(memory_cap_fraction(cfg["memory_cap_gb"], total, context),
                                                       device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.get("threads", 1))
    result = bench_worker.run(mode, cfg, rank, device)
    result["cuda_context"] = context
    return result


def memory_cap_fraction(cap_gb: float, total: int, context: int) -> float:
    """The allocator's share of a device of ``total`` bytes such that allocator + ``context`` fit in ``cap_gb``."""
    return max(0.0, min(1.0, (cap_gb * 2**30 - context) / total))


def run_mode(mode: str, cfg: dict, timeout: float = 3600) -> list[dict]:
    """Run one mode on ``cfg['world_size']`` fresh processes; the per-rank results."""
    backend = "nccl" if cfg["device"] == "cuda" else "gloo"
    return run_ranks(_bench_rank, cfg["world_size"], mode, cfg, backend=backend, timeout=timeout)


def predict(cfg: dict) -> dict:
    inv = build_inventory(cfg["model_config"], name=cfg["model"])
    setup = Setup(gpus=cfg["world_size"], gpu_mem_gb=cfg.get("fit_gb") or 80.0, seq_len=cfg["seq_len"],
                  batch=cfg["batch"], dtype=cfg["dtype"], activation_checkpointing=cfg["activation_checkpointing"],
                  offload_param=cfg["offload_param"], device=cfg["device"], fused_adamw=cfg["device"] == "cuda",
                  zero=ZeroKnobs.from_ds_config(cfg.get("zero") or {}))
    in_train_dtype = replace(setup, accum_dtype=cfg["dtype"])  # a buffer in the training dtype (lomo_clip_buffered)
    return {m: breakdown(inv, in_train_dtype if MODES[m].plan_accum_dtype == "train" else setup, MODES[m].plan or m)
            for m in MODES}


def resolve_zero(overrides: dict, inv: Inventory, world: int, dtype: str, mem_bytes: int | None) -> dict:
    """zero_optimization overrides with "auto" gathering limits filled for this model, world and memory."""
    return fill_auto(overrides, inv.numels, world, DTYPE_BYTES[dtype], mem_bytes)


def fit_gb(cfg: dict) -> float | None:
    """The memory one rank may use: the CUDA cap, or on CPU the available RAM shared by the ranks."""
    if cfg.get("memory_cap_gb"):
        return cfg["memory_cap_gb"]
    if cfg["device"] == "cpu":
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return avail / 2**20 / cfg["world_size"]
    return None


def ratios(results: dict) -> dict:
    """Step-time ratios of the pairs in RATIOS, one per round (modes ran interleaved): median and spread."""
    out = {}
    for a, b, meaning in RATIOS:
        if a not in results or b not in results:
            continue
        per_round = [_step_s(ra) / _step_s(rb) for ra, rb in zip(results[a], results[b])
                     if _ok(ra) and _ok(rb)]
        if per_round:
            out[f"{a}/{b}"] = {"meaning": meaning, "rounds": per_round, "median": statistics.median(per_round),
                               "min": min(per_round), "max": max(per_round)}
    return out


def _ok(ranks):
    return all(r["status"] == "ok" for r in ranks)


def _step_s(ranks):
    return max(r["median_step_s"] for r in ranks)


def _cuda_available() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # ask NVML: no CUDA context in the parent
    import torch

    return torch.cuda.is_available()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lomo_trainer.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help=f"model preset: {', '.join(PRESETS)} (random weights)")
    ap.add_argument("--model-config", help="a config.json or local model folder of any HF causal LM, or a hub name of "
                    "a preset (overrides --preset; random weights)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode, after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--offload-param", action="store_true")
    ap.add_argument("--memory-cap-gb", type=float, help="CUDA: cap each process at this many GB "
                    "(set_per_process_memory_fraction); CPU: not enforced. Both: modes the planner says need more are not run")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--repeat", type=int, default=1, help="rounds: every mode once per round, fresh processes, the "
                    "order rotated each round; step time = median over rounds, ratios with their spread")
    ap.add_argument("--zero", default="{}", help="zero_optimization overrides as JSON; \"auto\" for "
                    "stage3_max_live_parameters / stage3_max_reuse_distance / stage3_prefetch_bucket_size fills "
                    "them as LOMOTrainer does (gathering.py)")
    ap.add_argument("--auto-gathering", action="store_true", help="shorthand: the three gathering limits \"auto\"")
    ap.add_argument("--run-unfit", action="store_true", help="also run modes the planner says do not fit")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if args.steps < 1 or args.warmup < 0 or args.world_size < 1 or args.repeat < 1:
        ap.error("--steps and --repeat must be >= 1, --warmup >= 0 and --world-size >= 1")
    try:
        args.zero = json.loads(args.zero)
        assert isinstance(args.zero, dict)
    except (ValueError, AssertionError):
        ap.error(f"--zero: a JSON object of zero_optimization keys, got {args.zero!r}")
    if args.auto_gathering:
        args.zero.update(dict.fromkeys(GATHERING_KEYS, "auto"))
    return args, modes


def main(argv=None) -> dict:
    args, modes = parse_args(argv)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and _cuda_available()) else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401  (imported once here; forked ranks inherit it)
        import transformers  # noqa: F401

        from .. import _zero

        _zero.disable_cpu_shm_build()
    try:
        name, model_config = load_config(args.model_config or args.preset)
        inv = build_inventory(model_config, name=name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    cfg = {"model": name, "model_config": model_config, "n_params": inv.n_params, "seq_len": args.seq_len,
           "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "world_size": args.world_size,
           "dtype": args.dtype, "activation_checkpointing": args.activation_checkpointing,
           "offload_param": args.offload_param, "memory_cap_gb": args.memory_cap_gb, "device": device,
           "threads": args.threads, "lr": args.lr, "repeat": args.repeat}
    cfg["fit_gb"] = fit_gb(cfg)
    mem = int(cfg["fit_gb"] * 2**30) if device == "cuda" and cfg["fit_gb"] else None
    cfg["zero"] = resolve_zero(args.zero, inv, args.world_size, args.dtype, mem)
    predictions = predict(cfg)
    unfit = [m for m in modes if cfg["fit_gb"] and not args.run_unfit
             and predictions[m]["total_with_overhead"] > cfg["fit_gb"] * 2**30]
    results = {m: [] for m in modes}
    for r in range(args.repeat):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotated: no mode always runs first
        for mode in order:
            if mode in unfit:
                if r == 0:
                    print(f"[bench] {mode}: the planner needs {predictions[mode]['total_with_overhead'] / 2**30:.1f} "
                          f"GiB per rank, {cfg['fit_gb']:.1f} GiB available: not run", flush=True)
                results[mode].append([{"mode": mode, "status": "does not fit (planned)", "rank": 0}])
                continue
            print(f"[bench] round {r + 1}/{args.repeat}: {mode} on {args.world_size} {device} rank(s) ...", flush=True)
            results[mode].append(run_mode(mode, cfg))
    report = bench_report.build(cfg, results, predictions)
    report["ratios"] = ratios(results)
    report["command"] = "python -m lomo_trainer.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    md = bench_report.markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    bench_report.plot(report, os.path.join(args.out, "bench.png"))
    print(md)
    return report


if __name__ == "__main__":
    main()
