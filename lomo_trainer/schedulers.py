"""DeepSpeed's scheduler blocks (WarmupLR, WarmupDecayLR, WarmupCosineLR) as torch LambdaLR schedules.

DeepSpeed builds its schedulers around its own optimizer, which a LOMO engine does not have; the same
curves are reproduced here, driving ``param_groups[i]["lr"]`` of the LOMO optimizer. Parameter names and
defaults follow deepspeed/runtime/lr_schedules.py; "auto" values come from TrainingArguments as in HF.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from .config import SCHEDULER_PARAMS, ConfigError

_KNOWN = SCHEDULER_PARAMS


def _warmup_gamma(step: int, warmup: int, kind: str) -> float:
    if kind == "log":  # DeepSpeed's default: log(step + 1) / log(warmup)
        return math.log(step + 1) / math.log(warmup)
    return step / warmup


def deepspeed_scheduler(block: dict, optimizer, num_training_steps: int, args) -> LambdaLR:
    kind = block["type"]
    params = dict(block.get("params") or {})
    unknown = set(params) - _KNOWN[kind]
    if unknown:
        raise ConfigError(f"scheduler.params has unknown key(s) {sorted(unknown)} for {kind}: allowed are "
                          f"{sorted(_KNOWN[kind])}")

    def get(key, default):
        value = params.get(key, default)
        return default if value == "auto" else value

    base_lr = optimizer.param_groups[0]["lr"]
    warmup = max(2, int(get("warmup_num_steps", args.get_warmup_steps(num_training_steps))))  # DeepSpeed's floor
    wtype = get("warmup_type", "log")
    if wtype not in ("log", "linear"):
        raise ConfigError(f"scheduler.params.warmup_type={wtype!r}: use \"log\" or \"linear\"")
    total = int(get("total_num_steps", num_training_steps))

    # LambdaLR's step k applies DeepSpeed's iteration k - 1: DeepSpeed sets the lr of iteration 0 only after
    # its first step() (before that: warmup_min_lr, or 0 for the cosine schedule).
    if kind == "WarmupCosineLR":
        min_ratio, cos_min = float(get("warmup_min_ratio", 0.0)), float(get("cos_min_ratio", 1e-4))

        def factor(k):
            j = k - 1
            if j < 0:
                return 0.0
            if j < warmup:
                return min_ratio + (1 - min_ratio) * _warmup_gamma(j, warmup, wtype)
            progress = min(1.0, (j - warmup + 1) / max(1, total - warmup))
            return max(0.0, cos_min + (1 - cos_min) * (1 + math.cos(math.pi * progress)) / 2)
        return LambdaLR(optimizer, factor)

    lo, hi = float(get("warmup_min_lr", 0.0)), float(get("warmup_max_lr", base_lr))
    if not math.isclose(hi, base_lr):
        raise ConfigError(f"scheduler.params.warmup_max_lr={hi} but the optimizer lr is {base_lr}: "
                          "set one to match or use \"auto\"")

    def factor(k):
        j = k - 1
        if j < 0:
            gamma = 0.0
        elif j < warmup:
            gamma = _warmup_gamma(j, warmup, wtype)
        elif kind == "WarmupDecayLR":
            gamma = max(0.0, (total - j) / max(1.0, total - warmup))
        else:
            gamma = 1.0
        return (lo + (hi - lo) * gamma) / base_lr if base_lr else 0.0
    return LambdaLR(optimizer, factor)
