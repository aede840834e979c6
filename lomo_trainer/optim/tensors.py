"""Tensor helpers every update rule shares: the finite check, update-sized slices, and the guarded write."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..rounding import stochastic_round_to_bf16_

# The update's fp32 math runs over slices of at most this many elements, so its temporaries (fp32 gradient and
# weight, stochastic-rounding noise) stay at ~50 MB whatever the parameter's size: 7B's 131M-element embedding on
# one GPU would otherwise need ~1.5 GB of them.
UPDATE_CHUNK = 1 << 22


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``t`` is finite, as a device bool (no host sync). One read of ``t``: ``aminmax``
    propagates NaN and meets any infinity as its min or max; ``isfinite(t).all()`` costs ~13x more on CPU."""
    if t.numel() == 0:  # aminmax refuses an empty tensor (an all-padding shard)
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return lo.isfinite() & hi.isfinite()


def chunks(g: torch.Tensor, w: torch.Tensor):
    """Matching slices of gradient and weight (flattened), at most UPDATE_CHUNK elements each; at least one (an
    all-padding shard yields one empty slice, which still takes part in every collective)."""
    n = g.numel()
    if n <= UPDATE_CHUNK or not w.is_contiguous():
        yield g, w
        return
    g, w = g.reshape(-1), w.view(-1)
    for start in range(0, n, UPDATE_CHUNK):
        yield g[start:start + UPDATE_CHUNK], w[start:start + UPDATE_CHUNK]


def spans(g: torch.Tensor, w: torch.Tensor, start: int):
    """``chunks`` with offsets: (grad, weight, offset in the flattened parameter, offset in the shard)."""
    k = 0
    for gc, wc in chunks(g, w):
        yield gc, wc, start + k, k
        k += gc.numel()


def to_weight_device(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient slice where its weight lives. With offload_param the shard is on the host: a blocking copy,
    since the update reads it on the host at once. Everything that feeds a collective is computed before this
    copy, on the gradient's device."""
    return g if g.device == w.device else g.to(w.device)


class GuardedWriter:
    """Writes fp32 update results into weights: rounded to the weight's dtype (stochastically for bf16 when asked),
    and only where the whole result is finite there. A refused slice keeps its old values and adds one to a device
    flag, read at the next step's host sync (no sync here)."""

    def __init__(self, stochastic_rounding: bool = False, seed: int = 0):
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.flags: dict[torch.device, torch.Tensor] = {}  # unwritten slices since the last take_flags, by device

    def write(self, w: torch.Tensor, new: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """``new`` (fp32, a temporary) into ``w`` if all of it is finite in ``w``'s dtype (an fp16 value above 65504
        is not) and ``ok`` (a device bool) holds."""
        if new.dtype != w.dtype:
            out = torch.empty_like(w)
            if self.stochastic_rounding and w.dtype == torch.bfloat16:
                stochastic_round_to_bf16_(out, new, self.generator(w.device))
            else:
                out.copy_(new)
            new = out
        finite = all_finite(new)
        ok = finite if ok is None else finite & ok
        self.flag(w.device).add_(~ok)
        torch.where(ok, new, w, out=w)  # element-wise, so writing into an input is safe

    def flag(self, device: torch.device) -> torch.Tensor:
        flag = self.flags.get(device)
        if flag is None:
            flag = self.flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        return flag

    def take_flags(self, device: torch.device, carried: float = 0.0) -> torch.Tensor:
        """The unwritten-slice count since the last take (plus ``carried``), on ``device``, and reset (stream order
        makes the read precede the reset on one device; a host flag is copied synchronously)."""
        total = torch.full((), float(carried), device=device)
        for flag in self.flags.values():
            total = total + flag.to(device)
            flag.zero_()
        return total

    def reset_flags(self) -> None:
        for flag in self.flags.values():
            flag.zero_()

    def pending(self) -> int:
        """Unread flags (a host sync: once per checkpoint)."""
        return int(sum(f.item() for f in self.flags.values()))

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            rank = dist.get_rank() if dist.is_initialized() else 0
            gen.manual_seed(self.seed * 1000003 + rank)
            self.generators[device] = gen
        return gen
