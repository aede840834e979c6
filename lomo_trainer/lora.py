"""LOMO + LoRA: peft's LoRA model around a model whose base weights LOMO trains, its config, saving and merging.

The base weights (frozen in a LoRA run, trainable here) take LOMO's update; the adapters take a torch optimizer's,
after the same backward (``optim/adapters.py``). The adapters' lr lives in LOMO's second parameter group, so the lr
scheduler drives both lrs.

Configuration: a ``lora`` block (DeepSpeed JSON top level, run config, or ``LOMOTrainer(lomo_args={"lora": ...})``)::

    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
             "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "weight_decay": 0.0}}}

Everything but ``optimizer`` is a peft ``LoraConfig`` field; the optimizer is a ``torch.optim`` class name whose
update is element-wise (the adapters are sharded flat under ZeRO-3), with torch's defaults for unset params.
The block's checks live in lora_config.py (read at start-up by config.py, which imports no engine code).
"""
from __future__ import annotations


import torch
from torch import nn

from . import _zero
from .errors import ConfigError
from .lora_config import require_peft

ADAPTER_FOLDER = "adapter"  # the peft folder inside a saved model folder


# ---------------------------------------------------------------- the model
def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def prepare_model(model, block: dict | None):
    """The peft model LOMO+LoRA trains: ``model`` wrapped by ``get_peft_model`` with the block's LoraConfig (or a
    peft LoRA model as given), every base weight made trainable (LOMO updates it). Before DeepSpeed's engine."""
    peft = require_peft()
    if is_peft_model(model):
        if block and block.get("config_given"):
            raise ConfigError("the model is already a peft model: remove the lora block's LoraConfig fields (its "
                              "optimizer may stay)")
        configs = model.peft_config
        if len(configs) != 1:
            raise ConfigError(f"the peft model has {len(configs)} adapters: LOMO+LoRA trains one")
        config = next(iter(configs.values()))
        if config.peft_type != peft.PeftType.LORA:
            raise ConfigError(f"the peft model's adapter is {config.peft_type}: LOMO+LoRA supports LoRA only")
        extra = [k for k in ("use_dora", "modules_to_save", "trainable_token_indices") if getattr(config, k, None)]
        if extra or getattr(config, "bias", "none") != "none":
            raise ConfigError(f"the peft model's LoraConfig sets {extra or ['bias']}: not supported with LOMO; "
                              "use plain LoRA layers")
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(**block["config"]))
    for p in model.parameters():
        p.requires_grad_(True)  # base weights: LOMO's; adapters: the adapter optimizer's
    return model


def adapter_prefix(model) -> str:
    return model.base_model.prefix  # "lora_": peft's own test for an adapter parameter (its mark-trainable rule)


def adapter_parameters(model) -> list[nn.Parameter]:
    prefix = adapter_prefix(model)
    return [p for n, p in model.named_parameters() if prefix in n]


def _adapter_name(model) -> str:
    return next(iter(model.peft_config))


def base_key(name: str) -> str:
    """A base weight's name in the plain model (as ``merge_and_unload`` leaves it)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def adapter_key(model, name: str) -> str:
    """An adapter weight's name in peft's saved file (peft drops the adapter name)."""
    return name.replace(f".{_adapter_name(model)}.", ".")


def file_key(model, name: str) -> str:
    """Where parameter ``name`` is saved: the base folder's name, or the adapter folder's."""
    return adapter_key(model, name) if adapter_prefix(model) in name else base_key(name)


def split_state_dict(model, state_dict: dict) -> tuple[dict, dict]:
    """(base weights under the plain model's names, adapters under peft's file names)."""
    prefix = adapter_prefix(model)
    base = {base_key(k): v for k, v in state_dict.items() if prefix not in k}
    adapters = {adapter_key(model, k): v for k, v in state_dict.items() if prefix in k}
    return base, adapters


@torch.no_grad()
def merge_into(model, base: dict, is_main: bool) -> None:
    """Add each LoRA layer's delta (peft's ``get_delta_weight``) to its base weight in ``base`` (rank 0's gathered
    state dict). Collective under ZeRO-3: each layer's adapters are gathered on every rank in turn."""
    from peft.tuners.lora import LoraLayer

    adapter = _adapter_name(model)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        own = [p for n, p in module.named_parameters() if adapter_prefix(model) in n]
        with _zero.gathered(own):
            delta = module.get_delta_weight(adapter) if is_main else None
        if is_main:
            key = base_key(f"{name}.base_layer.weight")
            base[key] = (base[key].float() + delta.float().to(base[key].device)).to(base[key].dtype)


def save_adapter(model, folder: str, adapters: dict) -> None:
    """The adapters alone, as peft saves them (``PeftModel.from_pretrained`` loads the folder)."""
    adapter = _adapter_name(model)
    full = {n: adapters[adapter_key(model, n)] for n, _ in model.named_parameters() if adapter_key(model, n) in adapters}
    model.save_pretrained(folder, state_dict=full, safe_serialization=True, selected_adapters=[adapter])


def describe(model) -> str:
    """One log line: what LOMO and what the adapter optimizer train (ZeRO-3 parameters counted at full size)."""
    adapters = sum(_zero.full_numel(p) for p in adapter_parameters(model))
    total = sum(_zero.full_numel(p) for p in model.parameters())
    return (f"LOMO+LoRA: {total - adapters:,} base parameters (LOMO), {adapters:,} adapter parameters "
            f"({100 * adapters / max(total, 1):.2f}% of all; fp32 masters + AdamW state: "
            f"{adapters * 12 / 2**20:.1f} MiB over all ranks)")
