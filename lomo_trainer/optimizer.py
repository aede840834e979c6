"""LOMO: SGD fused into backward (LOw-Memory Optimization, arXiv 2306.09782).

Each parameter is updated by a hook the moment its gradient has been accumulated, and the gradient is
dropped right away: there is no optimizer state and never more than one gradient alive (two with
``overlap_comm``, whose reduction runs while backward goes on). Under DeepSpeed ZeRO-3 the hook
reduce-scatters the gradient so that every rank updates only its own shard.

One training step::

    optimizer = LOMO(model_or_engine, lr=1e-3, clip_grad_norm=1.0)

    def closure():                       # forward only: LOMO runs the backward passes itself
        return model(**batch).loss       # the bare module or the DeepSpeed engine, both work

    loss = optimizer.step(closure)       # 1 backward, or 2 with global-norm clipping or fp16
    scheduler.step()                     # lr lives in param_groups, as in torch

There is no ``zero_grad``/``backward``/``step`` sequence: ``backward`` is the update. With global-norm
clipping (and with fp16, whose overflow check must precede every update) the closure is called twice:
the first backward only measures the norm, the second updates. Both passes see the same RNG state,
so dropout masks agree.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import _zero
from .loss_scaler import DynamicLossScaler
from .rounding import stochastic_round_to_bf16_

CLIP_MODES = ("global", "per_param")
# The update's fp32 math runs over slices of at most this many elements, so its temporaries (fp32 gradient
# and weight, stochastic-rounding noise) stay at ~50 MB whatever the parameter's size: 7B's 131M-element
# embedding on one GPU would otherwise need ~1.5 GB of them.
UPDATE_CHUNK = 1 << 22


class LOMO(torch.optim.Optimizer):
    """Fused SGD over a module, a DeepSpeed ZeRO-3 engine, or parameter groups of a module.

    Args:
        model: an ``nn.Module`` or a ``DeepSpeedEngine`` (ZeRO-3, created without an optimizer). A module
            that is later wrapped by ``deepspeed.initialize`` needs ``attach_engine(engine)``.
        params: optional parameter groups (dicts with ``params`` and per-group ``lr``/``weight_decay``);
            default: every parameter of ``model`` that requires grad, in one group.
        lr: learning rate (read from ``param_groups`` at every update, so schedulers drive it).
        weight_decay: decoupled weight decay: ``p -= lr * weight_decay * p``.
        clip_grad_norm: clip by gradient norm. With ``clip_mode="global"`` (the paper's choice) the norm is
            over all parameters and ranks, measured by a first backward pass, so each step costs two
            forward+backward passes. ``clip_mode="per_param"`` needs one pass: every parameter's gradient
            is clipped to this norm on its own; the direction of the full gradient can change, which
            global clipping never does.
        clip_grad_value: clamp every gradient element to ``[-v, v]`` (one pass).
        fp16: a ``DynamicLossScaler``, a DeepSpeed-style ``fp16`` dict, or True for defaults. Enables loss
            scaling; a step whose gradients overflow changes no parameter and lowers the scale.
        stochastic_rounding: for bf16 parameters, round the fp32 update result stochastically on
            write-back so that updates under one bf16 ulp are not lost.
        seed: seed of the stochastic-rounding generator (offset by rank).
        overlap_comm: launch each gradient's reduction asynchronously and apply the update when the next
            gradient is ready, so communication overlaps backward at the cost of one more gradient alive.
            Default: the engine's ``zero_optimization.overlap_comm`` (DeepSpeed's default for stage 3 is
            true); True for a plain module on several ranks. Never used on one rank (nothing to overlap).
    """

    def __init__(self, model, params: Iterable | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 clip_mode: str = "global", fp16: DynamicLossScaler | dict | bool | None = None,
                 stochastic_rounding: bool = False, seed: int = 0, overlap_comm: bool | None = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ValueError(f"clip_grad_value must be > 0 or None, got {clip_grad_value}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")

        self.engine = None
        if _zero.is_engine(model):
            self.attach_engine(model)
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"LOMO needs the model (nn.Module or DeepSpeedEngine), got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the module inside DistributedDataParallel: LOMO averages gradients itself")
        self.model = model
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.clip_mode = clip_mode
        if fp16 is True:
            fp16 = DynamicLossScaler()
        elif isinstance(fp16, dict):
            fp16 = DynamicLossScaler.from_ds_config(fp16)
        self.loss_scaler: DynamicLossScaler | None = fp16 or None
        self.stochastic_rounding = stochastic_rounding
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

        self.global_step = 0        # steps that updated the parameters
        self.grad_norm: float | None = None  # global norm of the last step, when it was measured
        self.last_step_skipped = False
        self.skipped_steps = 0      # steps that changed nothing (non-finite loss or gradient), in every precision
        self._phase: str | None = None
        self._norm_sq: torch.Tensor | None = None
        self._clip_coef = 1.0
        self._lr_scale = 1.0        # unscale (1 / loss scale) folded into the update
        self.hook_calls = 0         # hooks fired in the last backward pass
        self._checked = False
        self._world = 1
        self.overlap_comm = overlap_comm
        self._overlap = False       # resolved at the first step (needs the engine and the process group)
        self._pending = None        # (param, work, finish, world) of the reduction in flight

        self._index_groups()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]

    # ------------------------------------------------------------------ set-up
    def _index_groups(self) -> None:
        # parameter -> its group dict; rebuilt whenever torch replaces the group dicts (load_state_dict)
        self._group_of: dict[nn.Parameter, dict] = {p: g for g in self.param_groups for p in g["params"]}

    def attach_engine(self, engine) -> None:
        """Bind the ZeRO-3 engine that partitions this module (if the module was passed before
        ``deepspeed.initialize``). Parameter objects are the same, so the hooks stay valid."""
        if engine is not None:
            _zero.check_engine(engine)
        self.engine = engine
        self._checked = False

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ the step
    @property
    def needs_norm_pass(self) -> bool:
        return (self.clip_grad_norm is not None and self.clip_mode == "global") or self.loss_scaler is not None

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("LOMO updates inside backward: call optimizer.step(closure) with a closure that "
                               "runs the forward and returns the loss (it must not call backward).")
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        self._lr_scale = 1.0 / scale
        self._clip_coef = 1.0
        self.grad_norm = None
        self.last_step_skipped = False
        if not self._checked:
            self._check_binding()

        if self.needs_norm_pass:
            rng = _rng_state()
            loss = self._run_pass("norm", closure, scale)
            norm_sq = self._norm_sq
            if self.engine is not None and dist.is_initialized():
                dist.all_reduce(norm_sq)  # each rank summed the squares of its own shards
            norm_sq = norm_sq.item()  # the one host sync of a step
            if not math.isfinite(norm_sq):  # overflow (fp16) or a diverged loss: change nothing
                if self.loss_scaler is not None:
                    self.loss_scaler.update(True)
                self.last_step_skipped = True
                self.skipped_steps += 1
                return loss.detach()
            self.grad_norm = math.sqrt(norm_sq)
            if self.clip_grad_norm is not None and self.clip_mode == "global":
                self._clip_coef = min(1.0, self.clip_grad_norm / (self.grad_norm + 1e-6))
            _set_rng_state(rng)  # the update pass sees the same dropout masks as the norm pass

        loss = self._run_pass("update", closure, scale)
        _zero.refresh_partitions(self.engine)
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self.global_step += 1
        return loss.detach()

    def _run_pass(self, phase: str, closure, scale: float) -> torch.Tensor:
        self._phase = "closure"
        self.hook_calls = 0
        try:
            with torch.enable_grad():
                loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise RuntimeError("the LOMO closure must return the scalar loss tensor")
            self._phase = phase
            if phase == "norm":
                self._norm_sq = torch.zeros((), dtype=torch.float32, device=loss.device)
            with _zero.backward_allowed(self.engine):
                (loss * scale if scale != 1.0 else loss).backward()
            self._drain()  # the last parameter's reduction
        finally:  # also after an exception in the closure: later backward passes must not see a stale phase
            self._phase = None
            self._pending = None
        _zero.after_backward(self.engine)
        return loss

    def _check_binding(self) -> None:
        if self.engine is None and any(_zero.is_zero3_param(p) for p in self._group_of):
            raise RuntimeError("the model's parameters are ZeRO-3 partitioned but LOMO has no engine: "
                               "call optimizer.attach_engine(engine) after deepspeed.initialize")
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        overlap = self.overlap_comm
        if overlap is None:
            overlap = bool(self.engine.zero_overlap_comm()) if self.engine is not None else True
        self._overlap = overlap and self._world > 1
        self._checked = True

    # ------------------------------------------------------------------ the hook (hot path)
    def _hook(self, p: nn.Parameter) -> None:
        phase = self._phase
        if phase is None:
            return  # a backward outside LOMO.step (e.g. evaluation code): leave p.grad as torch would
        if phase == "closure":
            raise RuntimeError("the LOMO closure must not call backward(): return the loss, LOMO runs backward itself")
        self.hook_calls += 1
        grad, p.grad = p.grad, None
        overlap = self._overlap
        if _zero.is_zero3_param(p):
            work, finish = _zero.reduce_to_shard(p, grad, async_op=overlap)
            world = _zero.group_world_size(p)
        else:
            world = self._world
            # replicas must apply the same averaged gradient, never drift apart
            work = dist.all_reduce(grad, async_op=overlap) if world > 1 else None
            finish = lambda g=grad, w=p.data: (g, w)  # noqa: E731
        del grad
        # With overlap the collective runs while backward goes on; the previous parameter's update is applied
        # now, so at most one reduction (one more gradient) is in flight.
        pending, self._pending = self._pending, (p, work, finish, world)
        if pending is not None:
            self._apply(*pending)
        if not overlap:
            self._drain()

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._apply(*pending)

    def _apply(self, p: nn.Parameter, work, finish, world: int) -> None:
        if work is not None:
            work.wait()  # NCCL: the compute stream waits for the collective; the host does not block
        g, w = finish()
        # A shard that is all padding is empty here; it still takes part in the collectives below.
        factor = self._lr_scale / world  # averaging over ranks and unscaling fold into one multiply
        if self._phase == "norm":
            for gc, _ in _chunks(g, w):  # non-finite values (fp16 overflow) propagate into the sum
                self._norm_sq += self._grad32(gc, factor).square().sum()
            return
        coef = None
        if self.clip_grad_norm is not None and self.clip_mode == "per_param":
            # _chunks yields at least one slice (an all-padding shard: an empty one, summing to a 0 tensor)
            norm_sq = sum(self._grad32(gc, factor).square().sum() for gc, _ in _chunks(g, w))
            if _zero.is_zero3_param(p) and _zero.group_world_size(p) > 1:
                dist.all_reduce(norm_sq, group=_zero.partition_group(p))
            coef = (self.clip_grad_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)  # a tensor: no host sync
        group = self._group_of[p]
        for gc, wc in _chunks(g, w):
            gc = self._grad32(gc, factor)
            self._update(wc, gc if coef is None else gc * coef, group["lr"], group["weight_decay"])

    def _grad32(self, g: torch.Tensor, factor: float) -> torch.Tensor:
        """The gradient in fp32, averaged and unscaled, clamped by value when asked."""
        g = g.float()
        if factor != 1.0:
            g = g * factor
        if self.clip_grad_value is not None and self._phase == "update":
            g = g.clamp(-self.clip_grad_value, self.clip_grad_value)
        return g

    def _update(self, w: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> None:
        w32 = w if w.dtype == torch.float32 else w.float()
        if wd:
            w32.mul_(1.0 - lr * wd)
        w32.add_(g, alpha=-lr * self._clip_coef)
        if w32 is not w:
            if self.stochastic_rounding and w.dtype == torch.bfloat16:
                stochastic_round_to_bf16_(w, w32, self._generator(w.device))
            else:
                w.copy_(w32)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            rank = dist.get_rank() if dist.is_initialized() else 0
            gen.manual_seed(self._seed * 1000003 + rank)
            self._generators[device] = gen
        return gen

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # gradients never outlive their hook

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lomo"] = {
            "global_step": self.global_step,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lomo", None) or {}
        super().load_state_dict(state_dict)
        self._index_groups()
        self.global_step = int(extra.get("global_step", 0))
        if extra.get("loss_scaler") is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(extra["loss_scaler"])
        for dev, gen_state in (extra.get("generators") or {}).items():
            self._generator(torch.device(dev)).set_state(gen_state)

    @property
    def loss_scale(self) -> float | None:
        return self.loss_scaler.scale if self.loss_scaler is not None else None


def _chunks(g: torch.Tensor, w: torch.Tensor):
    """Matching slices of gradient and weight (flattened), at most UPDATE_CHUNK elements each."""
    n = g.numel()
    if n <= UPDATE_CHUNK or not w.is_contiguous():
        yield g, w
        return
    g, w = g.reshape(-1), w.view(-1)
    for start in range(0, n, UPDATE_CHUNK):
        yield g[start:start + UPDATE_CHUNK], w[start:start + UPDATE_CHUNK]


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
