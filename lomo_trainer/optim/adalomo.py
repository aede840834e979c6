"""AdaLomo's update rule (arXiv 2310.10195), exact under ZeRO-3 partitions, and the ``AdaLomo`` optimizer.

Per parameter, at step t (counted per parameter: steps whose update was committed), with the gradient G
(unscaled, clipped as LOMO clips it):

    beta2 = 1 - t ** decay_rate                                   (t = 1: beta2 = 0, the state is G^2 + eps1)
    matrix (..., R, C):  r = beta2 r + (1 - beta2) mean_cols(G^2 + eps1)      (one per row)
                         c = beta2 c + (1 - beta2) mean_rows(G^2 + eps1)      (one per column)
                         V = r c^T / mean(r)                      (over the R rows of each leading index)
    vector:              V = beta2 V + (1 - beta2) (G^2 + eps1)
    U = G / sqrt(V);  U = U / max(1, RMS(U) / clip_threshold)     (grouped update normalisation)
    lr_t = lr * max(eps2, RMS(theta))                             (theta before this step's write)
    theta = theta (1 - lr_t weight_decay) - lr_t U

The paper writes r and c as row and column sums and V = r c^T / (1^T r); its authors' code (CoLLiE's
``collie/optim/adalomo.py``, whose copy is lomo-optim's ``AdaLomo``, behind transformers' ``optim="adalomo"``)
keeps means. The two give the same V; the state here holds means, as the references do. Tensors of more than
two dimensions are a batch of matrices over the last two, as in Adafactor (the references index ``shape[0]`` and
``shape[1]`` and fail on them). Where the references differ from the paper, the paper and the references' common
choices are followed:
- ``clip_threshold`` (the paper's normalisation is its value 1.0) and decoupled weight decay scaled by lr_t (the
  paper has no weight decay) come from the references;
- the references' fixed ``loss_scale`` (2^10) is replaced by LOMO's dynamic fp16 scaler (none in fp32/bf16);
- the references advance the step counter even on a skipped step; here a skipped step (non-finite gradient)
  changes nothing, not the state and not t.

Under ZeRO-3 each rank owns a flat span of the flattened parameter. After LOMO's reduce-scatter it sums G^2 over
its span into partial row and column sums (a span covers partial rows), and its share of sum(theta^2); one
all-reduce of those rows + cols + 2 floats over the partition group gives every rank the whole parameter's
statistics. It then forms U on its span and all-reduces sum(U^2) (plus a non-finite count): two small collectives
per parameter, issued in backward order on every rank. No rank holds another rank's gradient. The row and column
statistics (small) are replicated on the ranks of the partition group; a vector's V is kept for the rank's span.
"""
from __future__ import annotations

import math

import torch

from .. import _zero
from .engine import LOMO
from .rules import UpdateRule
from .tensors import all_finite, spans, to_weight_device


class AdaLomoRule(UpdateRule):
    """The AdaLomo update of one parameter; hyperparameters from its param group (``defaults``)."""

    defaults = dict(clip_threshold=1.0, decay_rate=-0.8, eps1=1e-30, eps2=1e-3)

    def validate_group(self, group: dict) -> None:
        if not group["clip_threshold"] > 0:
            raise ValueError(f"clip_threshold must be > 0, got {group['clip_threshold']}")
        if not group["decay_rate"] < 0:
            raise ValueError(f"decay_rate must be < 0 (beta2_t = 1 - t ** decay_rate), got {group['decay_rate']}")
        if group["eps1"] < 0 or group["eps2"] < 0:
            raise ValueError(f"eps must be two numbers >= 0, got {(group['eps1'], group['eps2'])}")

    def prepare(self, p, g, w, step):
        """Partial statistics of this rank's span, summed over the partition group by one all-reduce:
        [row sums of G^2 | column sums of G^2 (matrices only) | sum theta^2 | sum G^2 (per-parameter clip)]."""
        shape = _zero.full_shape(p)
        lay = _Layout(shape) if len(shape) >= 2 else None
        n_stats = lay.rows + lay.cols if lay else 0
        stats = torch.zeros(n_stats + 2, dtype=torch.float32, device=g.device)
        rows, cols = stats[:lay.rows] if lay else None, stats[lay.rows:n_stats] if lay else None
        for gc, wc, offset, _ in spans(g, w, _zero.shard_offset(p)):
            g2 = step.clipping.clipped(gc).square()
            stats[n_stats] += wc.float().square().sum().to(stats.device)
            stats[n_stats + 1] += g2.sum()
            if lay is not None:
                lay.add_partial_sums(g2, offset, rows, cols)
        return stats, step.all_reduce(p, stats)

    def apply(self, p, g, w, prepared, step):
        stats, work = prepared
        if work is not None:
            work.wait()
        group, clipping = step.group(p), step.clipping
        shape = _zero.full_shape(p)
        numel = math.prod(shape)
        lay = _Layout(shape) if len(shape) >= 2 else None
        state = self._state(step.state(p), lay, g)
        eps1 = group["eps1"]
        n_stats = lay.rows + lay.cols if lay else 0
        coef = clipping.per_param_coef(stats[n_stats + 1])  # scales G, so G^2 sums by coef^2
        beta2 = 1.0 - (state["step"] + 1.0).pow(group["decay_rate"])
        start = _zero.shard_offset(p)

        if lay is not None:  # out of place: committed below only if the step is finite everywhere
            g2_rows, g2_cols = stats[:lay.rows], stats[lay.rows:n_stats]
            if coef is not None:
                g2_rows, g2_cols = g2_rows * coef.square(), g2_cols * coef.square()
            row = state["row"] * beta2 + (1 - beta2) * (g2_rows / lay.c + eps1)
            col = state["col"] * beta2 + (1 - beta2) * (g2_cols / lay.r + eps1)
            factors = lay.factors(row, col)
            new_state = {"row": row, "col": col}
            bad = (~all_finite(stats)).float()
        else:
            v = state["v"] * beta2
            for gc, _, _, k in spans(g, w, start):
                gc = clipping.clipped(gc, coef)
                v[k:k + gc.numel()].add_((gc.square() + eps1) * (1 - beta2))
            new_state = {"v": v}
            bad = (~all_finite(v)).float()

        def update(gc, offset, k):
            gc = clipping.clipped(gc, coef)
            if lay is not None:
                return lay.scale(gc, offset, *factors)
            return gc * v[k:k + gc.numel()].rsqrt()

        # RMS of the whole update: this span's sum of squares, summed over the group with a non-finite count
        usq = torch.stack([sum(update(gc, off, k).square().sum() for gc, _, off, k in spans(g, w, start)), bad])
        handle = step.all_reduce(p, usq)
        if handle is not None:
            handle.wait()
        ok = torch.isfinite(usq[0]) & (usq[1] == 0)
        denom = ((usq[0] / numel).sqrt() / group["clip_threshold"]).clamp(min=1.0)
        lr_t = group["lr"] * (stats[n_stats] / numel).sqrt().clamp(min=group["eps2"])
        decay = 1.0 - lr_t * group["weight_decay"]
        for gc, wc, offset, k in spans(g, w, start):
            u = to_weight_device(update(gc, offset, k), wc)
            new = wc.float() * decay.to(wc.device) if group["weight_decay"] else wc.float().clone()
            new.sub_(u.view(wc.shape) * (lr_t / denom).to(wc.device))
            step.write(wc, new, ok.to(wc.device))
        for key, value in new_state.items():  # a skipped parameter keeps its state and its step
            state[key].copy_(torch.where(ok, value, state[key]))
        state["step"].add_(ok.float())

    @staticmethod
    def _state(state: dict, lay, g: torch.Tensor) -> dict:
        """fp32 state on the gradient's device: the step count, and row/col statistics or this span's V."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=g.device)
            if lay is not None:
                state["row"] = torch.zeros(lay.rows, dtype=torch.float32, device=g.device)
                state["col"] = torch.zeros(lay.cols, dtype=torch.float32, device=g.device)
            else:
                state["v"] = torch.zeros(g.numel(), dtype=torch.float32, device=g.device)
        for key, value in state.items():  # a loaded checkpoint's state arrives on the CPU
            if value.device != g.device:
                state[key] = value.to(g.device)
        return state


class AdaLomo(LOMO):
    """Fused AdaLomo over a module or a DeepSpeed ZeRO-3 engine: ``LOMO`` with ``AdaLomoRule``; every LOMO argument
    (clipping, fp16, bf16 stochastic rounding, overlap_comm, accumulation, parameter groups, adapters) works as there.

    Args (besides LOMO's; each may also be set per parameter group):
        lr: base learning rate; the step is lr * max(eps2, RMS(parameter)), so a larger lr than SGD's, such as
            the paper's 1e-3 to 5e-4, is the right order.
        weight_decay: decoupled: ``theta -= lr_t * weight_decay * theta``, with the RMS-scaled lr_t.
        clip_threshold: the update's RMS is clipped to this (grouped update normalisation).
        decay_rate: beta2_t = 1 - t ** decay_rate; must be < 0.
        eps: (eps1 added to G^2, eps2 floor of the parameter RMS), the references' defaults.
    """

    def __init__(self, model, params=None, lr: float = 1e-3, weight_decay: float = 0.0, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, eps: tuple[float, float] = (1e-30, 1e-3), **lomo_kwargs):
        eps1, eps2 = eps
        rule = AdaLomoRule()
        rule.defaults = dict(clip_threshold=float(clip_threshold), decay_rate=float(decay_rate), eps1=float(eps1),
                             eps2=float(eps2))
        super().__init__(model, params, lr=lr, weight_decay=weight_decay, rule=rule, **lomo_kwargs)


class _Layout:
    """A parameter of shape (..., R, C) as B matrices R x C, flattened row-major; a flat span covers partial rows."""

    def __init__(self, shape):
        self.r, self.c = shape[-2], shape[-1]
        self.b = math.prod(shape[:-2])
        self.rows, self.cols = self.b * self.r, self.b * self.c

    def _padded(self, x: torch.Tensor, offset: int):
        """``x`` (flat, starting at ``offset``) zero-padded to whole rows: (rows x C, first row, lead)."""
        lead = offset % self.c
        nrows = -(-(lead + x.numel()) // self.c)
        if lead == 0 and x.numel() == nrows * self.c:
            return x.view(nrows, self.c), offset // self.c, 0
        buf = x.new_zeros(nrows * self.c)
        buf[lead:lead + x.numel()] = x
        return buf.view(nrows, self.c), offset // self.c, lead

    def _batch_of(self, first: int, n: int, device) -> torch.Tensor:
        return torch.arange(first, first + n, device=device) // self.r

    def add_partial_sums(self, g2: torch.Tensor, offset: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        if g2.numel() == 0:
            return
        m, first, _ = self._padded(g2, offset)
        rows[first:first + m.shape[0]] += m.sum(1)
        if self.b == 1:
            cols += m.sum(0)
        else:
            cols.view(self.b, self.c).index_add_(0, self._batch_of(first, m.shape[0], m.device), m)

    def factors(self, row: torch.Tensor, col: torch.Tensor):
        """1/sqrt of V's row and column factors: V = r c / mean(r), the mean over each matrix's R rows."""
        mean = row.view(self.b, self.r).mean(1, keepdim=True)
        return (row.view(self.b, self.r) / mean).rsqrt().reshape(-1), col.rsqrt()

    def scale(self, g: torch.Tensor, offset: int, row_f: torch.Tensor, col_f: torch.Tensor) -> torch.Tensor:
        """G / sqrt(V) on the span."""
        if g.numel() == 0:
            return g
        m, first, lead = self._padded(g, offset)
        n = m.shape[0]
        cf = col_f.view(1, self.c) if self.b == 1 else col_f.view(self.b, self.c)[self._batch_of(first, n, m.device)]
        return (m * row_f[first:first + n, None] * cf).reshape(-1)[lead:lead + g.numel()]
