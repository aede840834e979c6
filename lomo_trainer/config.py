"""LOMO hyperparameters from a DeepSpeed JSON config and TrainingArguments, validated up front.

Users already write DeepSpeed JSON; LOMOTrainer reads the same file:

    "optimizer": {"type": "LOMO", "params": {"lr": "auto", "weight_decay": "auto", "clip_grad_norm": "auto",
                                              "clip_grad_value": null, "clip_mode": "global",
                                              "stochastic_rounding": true}},
    "scheduler": {"type": "WarmupDecayLR", "params": {...}},   # DeepSpeed's names, run by torch's LambdaLR
    "fp16": {"enabled": "auto", "initial_scale_power": 16, ...}, "bf16": {"enabled": "auto"},
    "gradient_clipping": "auto", "zero_optimization": {"stage": 3, ...}

"auto" takes the TrainingArguments value, as in HF. Where two sources disagree, or a combination cannot work,
``validate`` raises a one-line ``ConfigError`` naming the keys, before any process group or GPU memory is used.
The ``optimizer`` and ``scheduler`` blocks are removed from what DeepSpeed sees: LOMO is not a DeepSpeed
optimizer, and DeepSpeed must build its engine without one (no fp32 master copy, no gradient buffers).
Clipping: an absent ``gradient_clipping`` means TrainingArguments.max_grad_norm (1.0 by default, which is
also DeepSpeed's default); 0 or null turns norm clipping off and saves the second backward pass.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

OPTIMIZER_PARAMS = {"lr", "weight_decay", "clip_grad_norm", "clip_grad_value", "clip_mode", "stochastic_rounding", "seed"}
SCHEDULERS = {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR"}
FP16_KEYS = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale"}


class ConfigError(ValueError):
    """A bad or contradictory configuration: the message names the key(s) and the fix."""


def load_json(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} does not exist: pass the path of a JSON file (see configs/)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _auto(value, fallback):
    return fallback if value == "auto" else value


def _number(key: str, value, *, positive: bool = False, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


@dataclass
class LOMOSettings:
    """Everything LOMOTrainer needs to build the optimizer and the scheduler."""

    lr: float
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    clip_mode: str = "global"
    stochastic_rounding: bool = False
    seed: int = 0
    fp16: dict | None = None      # DeepSpeed-style fp16 block when fp16 is on
    bf16: bool = False
    scheduler: dict | None = None  # DeepSpeed scheduler block, or None for TrainingArguments.lr_scheduler_type
    zero_stage: int | None = None
    warnings: list[str] = field(default_factory=list)

    def optimizer_kwargs(self) -> dict:
        return dict(lr=self.lr, weight_decay=self.weight_decay, clip_grad_norm=self.clip_grad_norm,
                    clip_grad_value=self.clip_grad_value, clip_mode=self.clip_mode, fp16=self.fp16,
                    stochastic_rounding=self.stochastic_rounding, seed=self.seed)


def validate(ds_config: dict | None, args, lomo_config: dict | None = None) -> LOMOSettings:
    """Check a DeepSpeed config (or None: no DeepSpeed) against TrainingArguments ``args``.

    ``lomo_config`` holds optimizer params for runs without a DeepSpeed JSON (same keys as
    ``optimizer.params``)."""
    ds = ds_config or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"the DeepSpeed config must be a JSON object, got {type(ds).__name__}")

    opt = ds.get("optimizer")
    params = dict(lomo_config or {})
    if opt is not None:
        if not isinstance(opt, dict) or "type" not in opt:
            raise ConfigError('optimizer must be {"type": "LOMO", "params": {...}}')
        if str(opt["type"]).lower() != "lomo":
            raise ConfigError(f"optimizer.type {opt['type']!r} is not supported by LOMOTrainer: set it to \"LOMO\" "
                              "(or use transformers.Trainer for DeepSpeed's own optimizers)")
        if lomo_config:
            raise ConfigError("optimizer params given both in the DeepSpeed JSON and as lomo_config: keep one")
        params = dict(opt.get("params") or {})
    unknown = set(params) - OPTIMIZER_PARAMS
    if unknown:
        raise ConfigError(f"optimizer.params has unknown key(s) {sorted(unknown)}: allowed are {sorted(OPTIMIZER_PARAMS)}")

    gas = _auto(ds.get("gradient_accumulation_steps", "auto"), args.gradient_accumulation_steps)
    if gas != 1 or args.gradient_accumulation_steps != 1:
        raise ConfigError(f"gradient_accumulation_steps={max(gas, args.gradient_accumulation_steps)}: LOMO updates "
                          "inside backward, so it must be 1; raise the micro-batch size (per_device_train_batch_size)")

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if ds_config is not None else None
    if ds_config is not None and stage != 3:
        raise ConfigError(f"zero_optimization.stage={stage}: LOMOTrainer's partitioned update needs stage 3 "
                          "(or run without a DeepSpeed config)")
    warnings = []
    if ds_config is not None:
        off_param = (zero.get("offload_param") or {}).get("device", "none")
        if off_param == "nvme":
            raise ConfigError("zero_optimization.offload_param.device='nvme' is not supported: use 'cpu' or 'none'")
        if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
            warnings.append("zero_optimization.offload_optimizer is ignored: LOMO keeps no optimizer state")

    fp16_block, bf16_block = ds.get("fp16") or {}, ds.get("bf16") or {}
    fp16 = bool(_auto(fp16_block.get("enabled", False), args.fp16))
    bf16 = bool(_auto(bf16_block.get("enabled", False), args.bf16))
    if ds_config is None:
        fp16, bf16 = bool(args.fp16), bool(args.bf16)
    else:
        if fp16 != bool(args.fp16) and "fp16" in ds and fp16_block.get("enabled") != "auto":
            raise ConfigError(f"fp16.enabled={fp16} in the DeepSpeed config but TrainingArguments.fp16={args.fp16}: "
                              "set one to match or use \"auto\"")
        if bf16 != bool(args.bf16) and "bf16" in ds and bf16_block.get("enabled") != "auto":
            raise ConfigError(f"bf16.enabled={bf16} in the DeepSpeed config but TrainingArguments.bf16={args.bf16}: "
                              "set one to match or use \"auto\"")
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled: choose one (fp16.enabled / bf16.enabled, --fp16 / --bf16)")
    unknown16 = set(fp16_block) - FP16_KEYS
    if fp16 and unknown16:
        raise ConfigError(f"fp16 has unknown key(s) {sorted(unknown16)}: allowed are {sorted(FP16_KEYS)}")

    lr = _number("optimizer.params.lr", _auto(params.get("lr", "auto"), args.learning_rate), allow_none=False)
    if "lr" in params and params["lr"] != "auto" and lr != args.learning_rate:
        raise ConfigError(f"optimizer.params.lr={lr} but TrainingArguments.learning_rate={args.learning_rate}: "
                          "set one to match or use \"auto\"")
    wd = _number("optimizer.params.weight_decay", _auto(params.get("weight_decay", "auto"), args.weight_decay),
                 allow_none=False)

    # Norm clipping: DeepSpeed's gradient_clipping and optimizer.params.clip_grad_norm mean the same thing.
    ds_clip = _auto(ds.get("gradient_clipping", "auto"), args.max_grad_norm)
    opt_clip = _auto(params.get("clip_grad_norm", "auto"), ds_clip)
    if "gradient_clipping" in ds and "clip_grad_norm" in params and ds["gradient_clipping"] != "auto" \
            and params["clip_grad_norm"] != "auto" and (ds_clip or None) != (opt_clip or None):
        raise ConfigError(f"gradient_clipping={ds_clip} but optimizer.params.clip_grad_norm={opt_clip}: "
                          "they are the same setting, keep one")
    clip_norm = _number("optimizer.params.clip_grad_norm", opt_clip)
    clip_value = _number("optimizer.params.clip_grad_value", params.get("clip_grad_value"), positive=True)
    clip_mode = params.get("clip_mode", "global")
    if clip_mode not in ("global", "per_param"):
        raise ConfigError(f"optimizer.params.clip_mode={clip_mode!r}: use \"global\" (exact, two backward passes) "
                          "or \"per_param\" (one pass)")
    sr = params.get("stochastic_rounding", False)
    if sr and not bf16:
        raise ConfigError("optimizer.params.stochastic_rounding needs bf16 weights: enable bf16 or remove it")

    scheduler = ds.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULERS:
            raise ConfigError(f"scheduler.type {scheduler.get('type') if isinstance(scheduler, dict) else scheduler!r}"
                              f" is not supported: use one of {sorted(SCHEDULERS)}, or drop the block and set "
                              "lr_scheduler_type in TrainingArguments")

    fp16_cfg = None
    if fp16:
        fp16_cfg = {k: v for k, v in fp16_block.items() if k not in ("enabled", "auto_cast")}
    return LOMOSettings(lr=lr, weight_decay=wd, clip_grad_norm=clip_norm or None, clip_grad_value=clip_value,
                        clip_mode=clip_mode, stochastic_rounding=bool(sr), seed=int(params.get("seed", args.seed)),
                        fp16=fp16_cfg, bf16=bf16, scheduler=scheduler, zero_stage=stage, warnings=warnings)


def engine_config(ds_config: dict, args, world_size: int) -> dict:
    """The config DeepSpeed gets: no optimizer, no scheduler, every "auto" resolved from ``args``."""
    cfg = copy.deepcopy(ds_config)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    micro = _auto(cfg.get("train_micro_batch_size_per_gpu", "auto"), args.per_device_train_batch_size)
    if micro != args.per_device_train_batch_size:
        raise ConfigError(f"train_micro_batch_size_per_gpu={micro} but TrainingArguments.per_device_train_batch_size="
                          f"{args.per_device_train_batch_size}: set one to match or use \"auto\"")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = 1
    total = _auto(cfg.get("train_batch_size", "auto"), micro * world_size)
    if total != micro * world_size:
        raise ConfigError(f"train_batch_size={total} but micro batch {micro} x {world_size} processes = "
                          f"{micro * world_size}: set it to \"auto\"")
    cfg["train_batch_size"] = total
    cfg["gradient_clipping"] = 0.0  # LOMO clips; DeepSpeed never sees a gradient
    for key, flag in (("fp16", args.fp16), ("bf16", args.bf16)):
        if key in cfg:  # DeepSpeed only casts the module; loss scaling is LOMO's, so its keys stay out
            block = cfg[key]
            cfg[key] = {"enabled": _auto(block.get("enabled", False), flag)}
            if "auto_cast" in block:
                cfg[key]["auto_cast"] = block["auto_cast"]
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":  # bucket sizes HF derives from the hidden size: DeepSpeed's defaults serve LOMO
            del zero[key]
    # save_model gathers the weights itself; this only keeps DeepSpeed's own save path consistent
    zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return cfg
