"""The LoRA adapters' rule (LOMO + LoRA): a torch optimizer over fp32 masters of this rank's adapter shards.

The adapter weights go through LOMO's hooks like every other parameter: averaged over the ranks (reduce-scattered
to the rank's shard under ZeRO-3), unscaled and clipped with everything else (the global norm covers base and
adapters). ``AdapterRule.apply`` keeps each clipped gradient; after backward, ``finish`` checks that all of them
are finite on every rank (LOMO+LoRA's one extra host sync per step) and steps the configured torch optimizer
(AdamW by default) on the masters, writing them back into the weights. A non-finite adapter gradient leaves the
adapters and their optimizer state as they were, counted like an update pass that overflowed.
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .. import _zero
from ..lora_config import check_optimizer
from .rules import UpdateRule
from .tensors import all_finite


class AdapterOptimizer:
    """A torch optimizer over fp32 master copies of this rank's adapter shards, stepped by LOMO after backward.

    ``grad_of(p)`` is where LOMO leaves ``p``'s averaged, unscaled, clipped shard gradient; ``step(lr)`` runs the
    optimizer on the parameters that got one and writes the masters back into the weights (rounded to their
    dtype). State (masters, the optimizer's own) is per rank: tensors and numbers only."""

    def __init__(self, spec: dict | None = None):
        spec = check_optimizer(spec)
        self.cls = getattr(torch.optim, spec["type"])
        self.kwargs = dict(spec["params"])
        default = inspect.signature(self.cls).parameters["lr"].default
        self.lr = float(self.kwargs.pop("lr", default))
        self.params: list[nn.Parameter] = []
        self.masters: dict[nn.Parameter, nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.ready: dict[nn.Parameter, None] = {}  # parameters with a gradient this step (ordered)

    def build(self, params) -> None:
        """Masters from the current shards (after DeepSpeed partitioned them)."""
        self.params = list(params)
        self.masters = {p: nn.Parameter(_zero.local_weight(p).detach().float().clone()) for p in self.params}
        self.optimizer = self.cls(list(self.masters.values()), lr=self.lr, **self.kwargs)

    def grad_of(self, p: nn.Parameter) -> torch.Tensor:
        m = self.masters[p]
        if m.grad is None:
            m.grad = torch.zeros_like(m)
        self.ready[p] = None
        return m.grad

    def bad_count(self, device) -> torch.Tensor:
        """Non-finite gradients among this step's (a device tensor: no host sync)."""
        bad = torch.zeros((), device=device)
        for p in self.ready:
            bad += (~all_finite(self.masters[p].grad)).float().to(device)
        return bad

    def step(self, lr: float, write) -> None:
        """Step the masters that got a gradient and write each into its weight through ``write(w, new)``."""
        for p in self.params:
            if p not in self.ready:
                self.masters[p].grad = None  # untouched this step: the optimizer skips it, as torch does
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for p in self.ready:
            write(_zero.local_weight(p), self.masters[p].detach().clone())
        self.discard()

    def discard(self) -> None:
        self.ready.clear()

    def state_dict(self) -> dict:
        return {"masters": [self.masters[p].detach().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> bool:
        """False (nothing loaded) when the saved shards have other shapes (another world size)."""
        masters = state["masters"]
        if len(masters) != len(self.params) or any(m.shape != self.masters[p].shape
                                                  for m, p in zip(masters, self.params)):
            return False
        with torch.no_grad():
            for m, p in zip(masters, self.params):
                self.masters[p].copy_(m)
        self.optimizer.load_state_dict(state["optimizer"])
        return True


class AdapterRule(UpdateRule):
    """The adapters' param group's rule: clipped gradients into ``AdapterOptimizer``, stepped once per step."""

    name = "adapters"  # its state's key in the optimizer's state_dict

    def __init__(self, spec: dict | None = None):
        self.optimizer = AdapterOptimizer(spec)

    def bind(self, params) -> None:
        if self.optimizer.optimizer is None:
            self.optimizer.build(params)  # masters of the shards, once partitioned

    def prepare(self, p, g, w, step):
        return step.launch_norm(p, g, w)

    def apply(self, p, g, w, prepared, step):
        coef = step.norm_coef(prepared)
        g = step.clipping.grad32(g) * step.clipping.global_coef
        self.optimizer.grad_of(p).copy_(g * coef if coef is not None else g)

    def finish(self, step) -> None:
        """Step the adapters if every rank's adapter gradients are finite (agreed and read here); otherwise leave
        them and their state, and flag the step as an update pass that overflowed (counted at the next sync)."""
        a = self.optimizer
        bad = a.bad_count(step.device)
        if step.world > 1:
            dist.all_reduce(bad)
        if bad.item():
            a.discard()
            step.writer.flag(step.device).add_(1.0)
            return
        a.step(step.group(a.params[0])["lr"], step.write)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict | None) -> None:
        a = self.optimizer
        if saved is None or not a.load_state_dict(saved):
            a.build(a.params)
            warnings.warn("the LoRA adapters' optimizer state was not restored (" +
                          ("none was saved" if saved is None else "saved on another number of ranks") +
                          "): it starts afresh from the current adapter weights")
