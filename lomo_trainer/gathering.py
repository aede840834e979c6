"""``"auto"`` for ZeRO-3's gathering limits: how many elements it may keep gathered between a parameter's uses.

With DeepSpeed's defaults (1e9 each) a model under ~1B parameters stays gathered whole on every rank once the
trace is complete (docs/benchmarks.md), so each rank holds its shard *and* the whole model: per-rank memory
does not fall with the number of GPUs. ``auto_gathering`` picks

    max_live_parameters = max_reuse_distance = clamp(n / (2 x gpus), largest parameter, 1e9)

- n / (2 x gpus): shard + gathered set = 1.5 n / gpus, so the per-rank peak falls with the GPU count and is
  below one process's (n) from 2 GPUs on; as large as that allows, since every element released early is
  all-gathered once more in backward (the extra communication this trades for memory).
- at least the largest parameter: it is gathered whole for its own use anyway; at most DeepSpeed's default.
- given the device's memory: at most a quarter of what the shard and ~1 GiB of CUDA context leave free (the
  rest is for activations), never below the largest parameter. With ``offload_param`` the shard is in host memory
  and leaves the device's memory alone.
- ``stage3_prefetch_bucket_size`` = min(DeepSpeed's 5e7, that limit).

Torch-free: used by the planner, the benchmark and ``config.engine_config`` (LOMOTrainer).
"""
from __future__ import annotations

KEYS = {"stage3_max_live_parameters": "max_live", "stage3_max_reuse_distance": "max_live",
        "stage3_prefetch_bucket_size": "prefetch"}
DEEPSPEED_DEFAULT_LIVE = int(1e9)
DEEPSPEED_DEFAULT_PREFETCH = int(5e7)
CONTEXT_BYTES = 2**30


def auto_gathering(numels: list[int], gpus: int, dtype_bytes: int = 2, gpu_mem_bytes: int | None = None,
                   offload_param: bool = False) -> dict:
    """The three zero_optimization keys for a model whose parameters have ``numels`` elements, on ``gpus``
    ranks of ``gpu_mem_bytes`` each (None: not limited by memory); ``offload_param``: the shards live on the host."""
    if gpus < 1 or not numels:
        raise ValueError(f"auto gathering needs gpus >= 1 and a model with parameters (gpus={gpus})")
    n, largest = sum(numels), max(numels)
    live = min(max(n // (2 * gpus), largest), DEEPSPEED_DEFAULT_LIVE)
    if gpu_mem_bytes:
        shard = 0 if offload_param else dtype_bytes * -(-n // gpus)
        free = gpu_mem_bytes - shard - CONTEXT_BYTES
        live = min(live, max(largest, free // (4 * dtype_bytes)))
    live = int(live)
    return {"stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
            "stage3_prefetch_bucket_size": min(DEEPSPEED_DEFAULT_PREFETCH, live)}


def fill_auto(zero: dict, numels: list[int], gpus: int, dtype_bytes: int = 2,
              gpu_mem_bytes: int | None = None) -> dict:
    """``zero`` (a zero_optimization block) with each gathering key that is ``"auto"`` filled; others kept."""
    if not any(zero.get(k) == "auto" for k in KEYS):
        return dict(zero)
    offload = (zero.get("offload_param") or {}).get("device", "none") == "cpu"
    picked = auto_gathering(numels, gpus, dtype_bytes, gpu_mem_bytes, offload)
    return {k: (picked[k] if k in KEYS and v == "auto" else v) for k, v in zero.items()}


def model_numels(model) -> list[int]:
    """Full element counts of a (possibly ZeRO-3-partitioned) torch module's parameters, in module order."""
    return [getattr(p, "ds_numel", None) or p.numel() for p in model.parameters()]


def device_memory_bytes() -> int | None:
    """Total memory of the current CUDA device, or None (CPU: not limited by memory)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
