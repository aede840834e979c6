"""Memory and speed of LOMO against DeepSpeed ZeRO-3 AdamW, SGD, the fwd+bwd floor and forward only.

    python -m lomo_trainer.bench --preset small --seq-len 256 --batch 2 --steps 3 --world-size 2 --out runs/bench

Every mode runs in fresh processes (one per rank; forked on CPU, spawned on CUDA so no rank inherits a CUDA
context), so peaks never mix. Writes OUT/bench.md (also printed), OUT/bench.json and OUT/bench.png.
Memory: on CUDA ``max_memory_allocated`` / ``max_memory_reserved``; on CPU peak RSS above the process's RSS
before the model was built (see bench/memstat.py). Each mode's peak sits next to the planner's prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import report as bench_report
from .worker import MODES
from .llama_shapes import PRESETS, LlamaShape, load_shape
from .planner import Setup, ZeroKnobs, breakdown
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
    shape = LlamaShape(**cfg["shape"])
    setup = Setup(gpus=cfg["world_size"], gpu_mem_gb=cfg.get("memory_cap_gb") or 80.0, seq_len=cfg["seq_len"],
                  batch=cfg["batch"], dtype=cfg["dtype"], activation_checkpointing=cfg["activation_checkpointing"],
                  offload_param=cfg["offload_param"], device=cfg["device"], fused_adamw=cfg["device"] == "cuda",
                  zero=ZeroKnobs())
    # the overlap keeps one more gradient alive after the peak (see planner.py): one prediction for both LOMOs
    return {m: breakdown(shape, setup, "lomo" if m == "lomo_sync" else m) for m in MODES}


def _cuda_available() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # ask NVML: no CUDA context in the parent
    import torch

    return torch.cuda.is_available()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lomo_trainer.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help=f"model preset: {', '.join(PRESETS)} (random weights)")
    ap.add_argument("--model-config", help="a LLaMA config.json or local model folder (overrides --preset)")
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
                    "(set_per_process_memory_fraction); CPU: recorded, not enforced")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if args.steps < 1 or args.warmup < 0 or args.world_size < 1:
        ap.error("--steps must be >= 1, --warmup >= 0 and --world-size >= 1")
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
        shape = load_shape(args.model_config or args.preset)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    cfg = {"shape": {k: v for k, v in shape.as_dict().items() if k != "n_params"}, "seq_len": args.seq_len,
           "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "world_size": args.world_size,
           "dtype": args.dtype, "activation_checkpointing": args.activation_checkpointing,
           "offload_param": args.offload_param, "memory_cap_gb": args.memory_cap_gb, "device": device,
           "threads": args.threads, "lr": args.lr}
    predictions = predict(cfg)
    results = {}
    for mode in modes:
        print(f"[bench] {mode} on {args.world_size} {device} rank(s) ...", flush=True)
        results[mode] = run_mode(mode, cfg)
    report = bench_report.build(cfg, results, predictions)
    report["command"] = "python -m lomo_trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
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
