"""Where a reduced shard gradient goes in each pass: the norm pass's sum, the accumulation buffer, or the update.

The engine's hook reduces a parameter's gradient to this rank's shard ``g`` (``w``: the shard of the weight) and
hands it to the pass's sink in two calls, so that a rule's small collectives overlap backward: ``prepare`` when the
reduction arrives, ``apply`` once the next parameter's reduction is under way.
"""
from __future__ import annotations

import torch
from torch import nn

from .clipping import Clipping
from .tensors import chunks


class NormSink:
    """The norm pass (global-norm clipping, fp16's overflow check): the squared norm of the unscaled, unclamped
    gradients; non-finite values (an fp16 overflow) propagate into the sum. Updates nothing."""

    def __init__(self, clipping: Clipping):
        self.clipping = clipping
        self.total: torch.Tensor | None = None

    def start(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float32, device=device)

    def prepare(self, p, g, w):
        return None

    def apply(self, p, g, w, prepared) -> None:
        for gc, _ in chunks(g, w):
            self.total += self.clipping.grad32(gc, clamp=False).square().sum()


class GradientBuffer:
    """Gradient accumulation: each shard gradient added to a buffer of this rank's shard (padding excluded), in
    ``dtype``, allocated at first use and reused; ``touched`` keeps backward order, the same on every rank."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.buffers: dict[nn.Parameter, torch.Tensor] = {}
        self.touched: dict[nn.Parameter, None] = {}

    def start(self, device: torch.device) -> None:
        pass

    def prepare(self, p, g, w):
        return None

    def apply(self, p, g, w, prepared) -> None:
        buf = self.buffers.get(p)
        if buf is None:  # where the shard lives
            buf = self.buffers[p] = torch.zeros(g.shape, dtype=self.dtype, device=g.device)
        buf.add_(g)
        self.touched[p] = None

    def norm_sq(self, clipping: Clipping, device: torch.device) -> torch.Tensor:
        """Squared norm of the summed, unscaled gradients; inf/nan propagate."""
        total = torch.zeros((), dtype=torch.float32, device=device)
        for p in self.touched:
            for gc, _ in chunks(self.buffers[p], self.buffers[p]):
                total += clipping.grad32(gc, clamp=False).square().sum().to(device)
        return total

    def clear(self) -> None:
        for p in self.touched:
            self.buffers[p].zero_()
        self.touched.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class UpdateSink:
    """The update pass: each shard through its param group's rule."""

    def __init__(self, rule_of, step):
        self.rule_of, self.step = rule_of, step

    def start(self, device: torch.device) -> None:
        pass

    def prepare(self, p, g, w):
        return self.rule_of(p).prepare(p, g, w, self.step)

    def apply(self, p, g, w, prepared) -> None:
        self.rule_of(p).apply(p, g, w, prepared, self.step)
