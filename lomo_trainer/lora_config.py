"""The ``lora`` block's schema: peft LoraConfig fields LOMO+LoRA supports and the adapters' element-wise optimizer.

Checked by peft's and torch's own constructors, with a one-line ConfigError naming the key. Data only: config.py
reads it at start-up without pulling in the engine (lora.py builds and trains the adapters).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .errors import ConfigError

# LoraConfig fields LOMO+LoRA supports: plain LoRA layers, whose merged weight is base + peft's delta weight
LORA_FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
               "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
               "alpha_pattern", "task_type"}
# torch.optim classes whose update is element by element: they work on a flat shard of a parameter
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")


def require_peft():
    """The peft module, or a ConfigError saying how to install it (peft is an optional dependency)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora needs peft: pip install peft (or lomo_trainer[lora])") from None
    return peft


def check_block(block, where: str = "lora") -> dict:
    """A ``lora`` block, checked by peft's and torch's own constructors: {"config": LoraConfig kwargs,
    "optimizer": {"type": ..., "params": {...}}}. One-line ConfigError naming the key otherwise."""
    if not isinstance(block, dict):
        raise ConfigError(f'{where} must be a JSON object like {{"r": 8, "lora_alpha": 16, "target_modules": '
                          f'["q_proj", "v_proj"]}}, got {type(block).__name__}')
    fields = {k: v for k, v in block.items() if k != "optimizer"}
    peft = require_peft()
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}: use peft LoraConfig fields ({sorted(LORA_FIELDS)}) "
                          "and optimizer")
    unsupported = sorted(set(fields) - LORA_FIELDS)
    if unsupported:
        raise ConfigError(f"{where}.{unsupported[0]} is not supported with LOMO: the base weights train in full, so "
                          "only plain LoRA layers are merged; remove it")
    if fields.get("bias", "none") != "none":
        raise ConfigError(f"{where}.bias={fields['bias']!r}: LOMO already trains every bias; use \"none\"")
    given = bool(fields)
    fields.setdefault("task_type", "CAUSAL_LM")
    try:
        peft.LoraConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    return {"config": fields, "config_given": given,
            "optimizer": check_optimizer(block.get("optimizer"), f"{where}.optimizer")}


def check_optimizer(spec, where: str = "lora.optimizer") -> dict:
    """The adapters' optimizer block ({"type": "AdamW"} by default), its values checked by the torch class itself."""
    spec = {"type": "AdamW"} if spec is None else spec
    if not isinstance(spec, dict) or set(spec) - {"type", "params"}:
        raise ConfigError(f'{where} must be like {{"type": "AdamW", "params": {{"lr": 5e-4}}}}, got {spec!r}')
    name = str(spec.get("type", "AdamW"))
    match = next((n for n in ELEMENTWISE if n.lower() == name.lower()), None)
    if match is None:
        raise ConfigError(f"{where}.type {name!r}: use an element-wise torch.optim class, one of {list(ELEMENTWISE)}")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params must be a JSON object, got {params!r}")
    try:  # torch's own checks of the values
        getattr(torch.optim, match)([nn.Parameter(torch.zeros(1))], **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.params: {str(e).splitlines()[0]}") from None
    return {"type": match, "params": dict(params)}
