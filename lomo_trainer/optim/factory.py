"""Building an optimizer from LOMOSettings: where the settings (plain data, config.py) meet the engine's classes."""
from __future__ import annotations

import torch

from . import LOMO, AdaLomo

# LOMOSettings.accumulation_dtype (a JSON string) -> the gradient buffer's torch dtype
BUFFER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def optimizer_kwargs(settings) -> dict:
    """The constructor keywords of the settings' optimizer: LOMO's, plus AdaLomo's own with AdaLomo."""
    buffered = settings.accumulation_dtype is not None
    # "buffered" is global clipping from the gradient buffer: to the engine, global clipping with accumulate=True.
    # An "auto" nobody resolved (clip_choice.resolve: LOMOTrainer does) takes the path that needs no memory: two passes.
    kwargs = dict(lr=settings.lr, weight_decay=settings.weight_decay, clip_grad_norm=settings.clip_grad_norm,
                  clip_grad_value=settings.clip_grad_value,
                  clip_mode="global" if settings.clip_mode in ("buffered", "auto") else settings.clip_mode,
                  fp16=settings.fp16,
                  stochastic_rounding=settings.stochastic_rounding, seed=settings.seed, accumulate=buffered)
    if buffered:
        kwargs["buffer_dtype"] = BUFFER_DTYPES[settings.accumulation_dtype]
    return {**kwargs, **settings.adalomo} if settings.optimizer == "adalomo" else kwargs


def build_optimizer(settings, model, **extra):
    """LOMO or AdaLomo (``settings.optimizer``) on ``model``, a DeepSpeed engine or a module. ``extra``: further
    constructor keywords, e.g. the LoRA adapters (``adapters``, ``adapter_optimizer``)."""
    cls = AdaLomo if settings.optimizer == "adalomo" else LOMO
    return cls(model, **optimizer_kwargs(settings), **extra)
