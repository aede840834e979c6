"""The rows: each optimizer variant, its lr grid, and how one training run of it is built (public APIs only).

Every trained row uses the same TrainingArguments apart from the lr (and the clipping each optimizer is meant
to have): fp32, one process, no DeepSpeed (ZeRO-3 changes where the update runs, not what it computes; the
project's tests check that equivalence), linear schedule with a short warmup, no weight decay.

- ``lomo``: LOMOTrainer, fused SGD, the paper's global-norm clipping at 1.0 (two backward passes per step).
- ``lomo_per_param``: the same, clip_mode "per_param" (each gradient clipped to norm 1.0 on its own, one pass).
- ``adalomo``: LOMOTrainer with AdaLomo; no gradient-norm clipping (its update RMS is clipped at 1.0), one pass.
- ``lomo_lora``: LOMOTrainer with a lora block: LOMO (global clipping at 1.0) on every base weight, AdamW at
  ``LORA_ADAPTER_LR`` on r=8 adapters of q_proj/v_proj; the lr swept is LOMO's.
- ``adamw``: the stock transformers Trainer, AdamW (torch), clipping at 1.0 (Trainer's default).
- ``lora_adamw``: the stock Trainer on a peft LoRA model (r=8, q_proj/v_proj), AdamW, clipping at 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LORA_ADAPTER_LR = 1e-3


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    lrs: tuple[float, ...]


VARIANTS = {v.name: v for v in (
    Variant("adalomo", "AdaLomo (LOMOTrainer)", (1e-3, 3e-3, 1e-2)),
    Variant("lomo", "LOMO, global-norm clip 1.0 (paper)", (0.1, 0.3, 1.0)),
    Variant("adamw", "stock Trainer, AdamW", (1e-4, 3e-4, 1e-3)),
    Variant("lomo_per_param", "LOMO, per-parameter clip 1.0", (0.01, 0.03, 0.1)),
    Variant("lora_adamw", "peft LoRA r8, AdamW (stock Trainer)", (1e-3, 3e-3, 1e-2)),
    Variant("lomo_lora", f"LOMO + LoRA r8 (adapters AdamW {LORA_ADAPTER_LR:g})", (0.1, 0.3, 1.0)),
)}
ORDER = tuple(VARIANTS)  # run order: if the run is cut short, the first rows are the most asked-about


def build_trainer(variant: str, model, args_kwargs: dict, lr: float, train, collator, callbacks):
    """A Trainer (stock or LOMOTrainer) for one run of ``variant`` at ``lr``."""
    from transformers import Trainer, TrainingArguments

    from lomo_trainer import LOMOArguments, LOMOTrainer

    clip = 0.0 if variant == "adalomo" else 1.0
    args = TrainingArguments(learning_rate=lr, max_grad_norm=clip, **args_kwargs)
    common = dict(args=args, train_dataset=train, data_collator=collator, callbacks=callbacks)
    if variant == "lomo":
        return LOMOTrainer(model=model, lomo_args=LOMOArguments(clip_mode="global"), **common)
    if variant == "lomo_per_param":
        return LOMOTrainer(model=model, lomo_args=LOMOArguments(clip_mode="per_param"), **common)
    if variant == "adalomo":
        return LOMOTrainer(model=model, lomo_args=LOMOArguments(optimizer="adalomo"), **common)
    if variant == "lomo_lora":
        block = dict(LORA, optimizer={"type": "AdamW", "params": {"lr": LORA_ADAPTER_LR, "weight_decay": 0.0}})
        return LOMOTrainer(model=model, lomo_args=LOMOArguments(clip_mode="global", lora=block), **common)
    if variant == "adamw":
        return Trainer(model=model, **common)
    if variant == "lora_adamw":
        from peft import LoraConfig, get_peft_model

        return Trainer(model=get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)), **common)
    raise ValueError(f"unknown variant {variant!r}; use one of {sorted(VARIANTS)}")
