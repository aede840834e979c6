"""The update-rule protocol (how one parameter's shard changes given its reduced gradient) and LOMO's SGD rule.

The engine (``engine.py``) owns hooks, reductions, passes and the step's host sync; a rule owns only the math of
one parameter's update. It sees each parameter twice, in backward order and on every rank in the same order:

- ``prepare(p, g, w, step)`` when the parameter's reduced shard gradient ``g`` arrives (``w``: the shard it
  updates). It may launch small collectives over the parameter's partition group (``step.all_reduce``: async when
  communication overlaps backward) and returns whatever ``apply`` needs;
- ``apply(p, g, w, prepared, step)`` a little later: waits for them and writes the new shard through
  ``step.write`` (rounded, and refused where not finite);
- ``finish(step)`` once after the update pass (the adapters' torch optimizer steps there).

``g`` is as reduced: loss-scaled under fp16 and in the training dtype; ``step.clipping`` turns it into the clipped
fp32 gradient (``clipping.py``). Per-parameter state lives in ``step.state(p)`` (the optimizer's ``state``, saved
in its ``state_dict``); hyperparameters in ``step.group(p)`` (its param group: schedulers drive ``lr`` there).
Write a new rule by subclassing ``UpdateRule`` and pass it as ``LOMO(model, rule=MyRule())``; see
``tests/test_rules.py`` for a normalised-SGD rule in a few lines.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import _zero
from .clipping import Clipping
from .tensors import GuardedWriter, chunks, to_weight_device


class StepContext:
    """What a rule may use of the engine during a step."""

    def __init__(self, optimizer, clipping: Clipping, writer: GuardedWriter):
        self._optimizer = optimizer
        self.clipping = clipping
        self.writer = writer
        self.overlap = False  # set by the engine once the process group is known
        self.world = 1
        self.device: torch.device | None = None  # the loss's device, for what ``finish`` reduces

    def group(self, p: nn.Parameter) -> dict:
        return self._optimizer.group_of(p)

    def state(self, p: nn.Parameter) -> dict:
        return self._optimizer.state[p]

    def write(self, w: torch.Tensor, new: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        self.writer.write(w, new, ok)

    def all_reduce(self, p: nn.Parameter, t: torch.Tensor):
        """Sum ``t`` in place over ``p``'s partition group (a no-op for a replicated parameter, whose gradient is
        already the same everywhere); the handle to wait on, or None."""
        if _zero.is_zero3_param(p) and _zero.group_world_size(p) > 1:
            return dist.all_reduce(t, group=_zero.partition_group(p), async_op=self.overlap)
        return None

    def launch_norm(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor):
        """Per-parameter clipping: launch the all-reduce of the shard's squared norm (None when not clipping per
        parameter). ``norm_coef`` turns the result into the coefficient."""
        if not self.clipping.is_per_param:
            return None
        norm_sq = self.clipping.norm_sq(g, w, clamp=True)
        return norm_sq, self.all_reduce(p, norm_sq)

    def norm_coef(self, launched) -> torch.Tensor | None:
        if launched is None:
            return None
        norm_sq, work = launched
        if work is not None:
            work.wait()
        return self.clipping.per_param_coef(norm_sq)


class UpdateRule:
    """How a parameter's shard changes. ``defaults``: hyperparameters the rule reads from each param group (added
    where a group lacks them; ``validate_group`` checks a group's values)."""

    defaults: dict = {}
    name: str | None = None  # a rule with state of its own saves it under this key of the optimizer's state_dict

    def validate_group(self, group: dict) -> None:
        pass

    def bind(self, params: list[nn.Parameter]) -> None:
        """Once, before the first step, after DeepSpeed has partitioned ``params`` (this rule's parameters)."""

    def prepare(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor, step: StepContext):
        return None

    def apply(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor, prepared, step: StepContext) -> None:
        raise NotImplementedError

    def finish(self, step: StepContext) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, saved: dict | None) -> None:
        pass


class SGD(UpdateRule):
    """LOMO's rule: ``w <- w (1 - lr wd) - lr coef g`` in fp32 (decoupled weight decay), the clipping coefficient
    folded into the step size."""

    def prepare(self, p, g, w, step):
        return step.launch_norm(p, g, w)

    def apply(self, p, g, w, prepared, step):
        coef = step.norm_coef(prepared)
        group = step.group(p)
        lr, wd = group["lr"], group["weight_decay"]
        alpha = -lr * step.clipping.global_coef
        for gc, wc in chunks(g, w):
            gc = step.clipping.grad32(gc)
            if coef is not None:
                gc = gc * coef
            gc = to_weight_device(gc, wc)
            # out of place, so that a non-finite result can be discarded; an fp32 weight takes one op instead of a
            # clone and an op (one pass less over the shard)
            if wc.dtype != torch.float32:
                new = wc.float()
                if wd:
                    new.mul_(1.0 - lr * wd)
                new.add_(gc, alpha=alpha)
            elif wd:
                new = torch.mul(wc, 1.0 - lr * wd).add_(gc, alpha=alpha)
            else:
                new = torch.add(wc, gc, alpha=alpha)
            step.write(wc, new)
