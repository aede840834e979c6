"""clip_mode "auto": global-norm clipping in one pass through a gradient buffer where it fits, else in two passes.

The same holds for fp16's overflow check; "fits" is the planner's peak with a margin.

The paper's recipe (fp16, ``max_grad_norm`` 1.0) needs the global gradient norm before any parameter moves. Two
ways give exactly the same update (both tested against a float64 reference): two passes (a norm pass, then a second
forward + backward that updates: "global"), or one pass whose reduced shard gradients go into a buffer of this
GPU's shards, the norm taken over the buffer ("buffered"). The buffer costs its dtype's bytes x parameters / GPUs
and saves a forward and a backward per step. "auto" (the default) takes it when it fits.

``choose`` is the decision, a pure function of the planner's figures; the planner computes them
(``bench.planner.plan_clip_mode``: model inventory on the meta device, GPUs, GPU memory, the first batch, the
settings) and calls it; ``resolve`` turns the settings' "auto" into "global" or "buffered"; ``agree`` makes every rank
take the same path (the two paths run different collectives, so ranks that disagreed would hang). This module
imports nothing of the package: the planner imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

# Headroom kept free beyond the planner's peak (which already counts 1 GiB of CUDA context and a 10% allocator
# reserve): the buffered path is taken only if its planned peak is at most (1 - MARGIN) of the GPU's memory.
MARGIN = 0.10
GIB = 2**30


@dataclass(frozen=True)
class Figures:
    """What the planner says for this run, per GPU (bytes)."""
    gpu_mem_bytes: int
    gpus: int
    n_params: int
    buffer_dtype: str      # the buffer's dtype should the buffered path be taken
    buffer_bytes: int      # the buffer on one GPU: its dtype's bytes x this GPU's shard elements
    two_pass_peak: int     # the planned peak of two-pass global clipping, overhead included
    buffered_peak: int     # the planned peak of one-pass buffered clipping, overhead included


@dataclass(frozen=True)
class Choice:
    clip_mode: str  # "global" (two passes) or "buffered" (one pass, a gradient buffer)
    reason: str

    def line(self) -> str:
        path = "buffered (one pass)" if self.clip_mode == "buffered" else "global (two passes)"
        return f"clip_mode auto -> {path}: {self.reason}"


def choose(figures: Figures | None, device: str = "cuda", problem: str | None = None) -> Choice:
    """The decision. ``figures``: the planner's, or None when it could not plan (``problem`` says why).
    Not on a GPU, or without figures: two passes, which need no memory beyond what LOMO already uses."""
    if device != "cuda":
        return Choice("global", f"not on a GPU ({device}): the planner's figures are GPU memory, two passes kept "
                                "(set clip_mode \"buffered\" to force one pass)")
    if figures is None:
        return Choice("global", f"the planner cannot read this model ({problem}): two passes kept (set clip_mode "
                                "\"buffered\" to force one pass)")
    f = figures
    limit = (1 - MARGIN) * f.gpu_mem_bytes
    facts = (f"buffer {f.buffer_bytes / GIB:.2f} GiB ({f.buffer_dtype} x {f.n_params / 1e9:.3f} B params / {f.gpus} "
             f"GPUs), planned peak {f.buffered_peak / GIB:.2f} GiB buffered vs {f.two_pass_peak / GIB:.2f} GiB "
             f"two-pass, limit {limit / GIB:.2f} GiB ({1 - MARGIN:.0%} of {f.gpu_mem_bytes / GIB:.1f} GiB)")
    if f.buffered_peak <= limit:
        return Choice("buffered", f"{facts}: the buffer fits, one forward+backward per step")
    return Choice("global", f"{facts}: the buffer does not fit with the margin, two passes")


def resolve(settings, choice: Choice):
    """The settings with clip_mode "auto" replaced by the choice (the buffer's dtype: ``auto_buffer_dtype``)."""
    if choice.clip_mode == "buffered":
        return replace(settings, clip_mode="buffered", accumulation_dtype=settings.auto_buffer_dtype)
    return replace(settings, clip_mode="global", accumulation_dtype=None)


def agree(choice: Choice, device) -> Choice:
    """The same path on every rank: buffered only if every rank chose it (GPUs of different sizes can differ)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choice
    flag = torch.tensor([1.0 if choice.clip_mode == "buffered" else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if choice.clip_mode == "buffered" and flag.item() == 0.0:
        return Choice("global", f"another rank's GPU has no room for the buffer (here: {choice.reason}): two passes "
                                "on every rank")
    return choice

