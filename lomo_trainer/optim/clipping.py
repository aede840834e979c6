"""Gradient clipping for every update rule: unscale x global coefficient x per-parameter coefficient, and the clamp.

A rule gets a shard's gradient as stored (loss-scaled under fp16, in the training dtype) and asks this module for
it in fp32: ``grad32`` unscales it and clamps it by value; ``coefficient`` is the product of the global-norm
coefficient (one float per step, from the norm pass or the buffer) and the per-parameter one (a device tensor from
the parameter's all-reduced norm: no host sync). SGD folds the product into its step size; rules that square the
gradient (AdaLomo) apply it to G with ``clipped``.
"""
from __future__ import annotations

import torch

from .tensors import chunks

MODES = ("global", "per_param")


class Clipping:
    """Clip by norm (``max_norm``: over everything with ``mode="global"``, or per parameter) and by value."""

    def __init__(self, max_norm: float | None = None, max_value: float | None = None, mode: str = "global"):
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {max_norm}")
        if max_value is not None and max_value <= 0:
            raise ValueError(f"clip_grad_value must be > 0 or None, got {max_value}")
        if mode not in MODES:
            raise ValueError(f"clip_mode must be one of {MODES}, got {mode!r}")
        self.max_norm, self.max_value, self.mode = max_norm, max_value, mode
        self.unscale = 1.0         # 1 / loss scale of the step under way
        self.global_coef = 1.0     # min(1, max_norm / global norm) once the step's norm is known

    @property
    def is_global(self) -> bool:
        return self.max_norm is not None and self.mode == "global"

    @property
    def is_per_param(self) -> bool:
        return self.max_norm is not None and self.mode == "per_param"

    def begin_step(self, loss_scale: float) -> None:
        self.unscale = 1.0 / loss_scale
        self.global_coef = 1.0

    def set_global_norm(self, norm: float) -> None:
        if self.is_global:
            self.global_coef = min(1.0, self.max_norm / (norm + 1e-6))

    def grad32(self, g: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """The gradient in fp32, unscaled (it was averaged over ranks before the reduction), clamped by value when
        asked and ``clamp`` (norms are taken before the clamp, updates after it)."""
        g = g.float()
        if self.unscale != 1.0:
            g = g * self.unscale
        if clamp and self.max_value is not None:
            g = g.clamp(-self.max_value, self.max_value)
        return g

    def norm_sq(self, g: torch.Tensor, w: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """The squared norm of ``g`` in fp32, unscaled, a device tensor (non-finite values propagate)."""
        return sum(self.grad32(gc, clamp).square().sum() for gc, _ in chunks(g, w))

    def per_param_coef(self, norm_sq: torch.Tensor | None) -> torch.Tensor | None:
        """min(1, max_norm / the parameter's norm) from its all-reduced squared norm; None when not per-parameter."""
        if norm_sq is None or not self.is_per_param:
            return None
        return (self.max_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)

    def clipped(self, g: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient slice in fp32, flat, unscaled, clamped, times the global and per-parameter coefficients."""
        g = self.grad32(g).reshape(-1)
        if self.global_coef != 1.0:
            g = g * self.global_coef
        if coef is not None:
            g = g * coef
        return g
