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

Non-finite values never reach the weights, in any precision:
- a step whose norm pass finds a non-finite gradient, or whose loss is non-finite on any rank, changes
  nothing (in the one-pass modes the loss is checked before backward, which is the update);
- the update pass can still overflow where the norm pass did not (the two passes are not bit-identical
  on GPU, and the fp16 scale lives at the overflow edge): each update slice whose result is not finite
  in the weight's dtype is left as it was, and a device-side flag counts it. The flag is read at the next
  step's host sync, which then counts the step as skipped and lowers the fp16 scale.
Every skip adds one to ``skipped_steps``; ``last_step_skipped`` says whether the step just taken changed
nothing.

Gradient accumulation (``accumulate=True``): the hooks add each reduced shard gradient to a buffer the size of
this rank's shards (``buffer_dtype``: fp32, or a 16-bit dtype for half the memory) instead of updating::

    optimizer = LOMO(engine, lr=1e-3, clip_grad_norm=1.0, accumulate=True)
    for micro_batch in micro_batches[:-1]:
        optimizer.accumulate(lambda: loss_of(micro_batch))  # backward into the buffer, no update, no host sync
    optimizer.step(lambda: loss_of(micro_batches[-1]))      # adds the last one, then updates from the buffer

``step`` then takes the global norm over the buffers (no second backward: one pass per micro-step, in every
clipping mode, also with a single micro-step), syncs once, and applies the rule shard by shard from the buffer.
A non-finite value in any micro-step (an fp16 overflow, a diverged loss) makes the buffer's norm non-finite: the
whole step is skipped and the buffer cleared. The loss of each micro-step must already carry its weight in the sum
(the trainer divides by the token count of all micro-steps and ranks, as the stock Trainer does).

LOMO + LoRA (``adapters=``, see ``lora.py``): peft's adapter weights go through the same hooks (averaged, unscaled,
clipped, counted in the global norm) into a gradient slot each; after backward a torch optimizer (AdamW by
default) steps fp32 masters of their shards and writes them back. A non-finite adapter gradient leaves the
adapters and their optimizer state as they were, counted like an update pass that overflowed.

Host synchronisations: exactly one per step, in every mode: the ``.item()``-like read of a few
all-reduced numbers (global norm, loss finiteness, the previous update pass's flag) after the norm pass,
or after the forward in the one-pass modes; LOMO + LoRA adds one after backward (the adapters' gradients must be
finite before their optimizer steps). None per parameter, except with ``offload_param``, where each
reduced gradient slice is copied to the host for the host-side update (the host waits for that copy).
``_zero.refresh_partitions`` does not synchronise.
"""
from __future__ import annotations

import math
import warnings
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
            scaling; a step whose gradients overflow changes no parameter and lowers the scale. Without fp16
            no scaler exists, and a skipped step touches none.
        stochastic_rounding: for bf16 parameters, round the fp32 update result stochastically on
            write-back so that updates under one bf16 ulp are not lost.
        seed: seed of the stochastic-rounding generator (offset by rank).
        overlap_comm: launch each gradient's reduction asynchronously and apply the update when the next
            gradient is ready, so communication overlaps backward at the cost of one more gradient alive.
            Default: the engine's ``zero_optimization.overlap_comm`` (DeepSpeed's default for stage 3 is
            true); True for a plain module on several ranks. Never used on one rank (nothing to overlap).
        accumulate: keep a shard-sized gradient buffer: ``accumulate(closure)`` adds a micro-step's gradient,
            ``step(closure)`` adds the last one and updates from the buffer (see the module doc). Costs
            ``buffer_dtype``'s bytes x this rank's shard elements; saves the norm pass of global clipping and fp16.
        buffer_dtype: the buffer's dtype (torch.float32, or bfloat16/float16 to halve it; fp16 gradients are kept
            loss-scaled there, so a sum can overflow where each micro-step did not: the step is then skipped).
        adapters: LoRA adapter parameters of ``model`` (LOMO + LoRA, see ``lora.py``): their gradients are averaged,
            unscaled and clipped like the others (the global norm covers both sets), then ``adapter_optimizer`` (a
            ``{"type": "AdamW", "params": {...}}`` dict) steps them after backward. They form the second param
            group, whose lr is the adapter optimizer's, so schedulers drive it too.

    Attributes read by the trainer: ``global_step`` (steps that updated), ``skipped_steps`` (steps skipped
    for a non-finite loss or gradient, in any precision; saved in ``state_dict``), ``last_step_skipped``
    (the step just taken changed nothing), ``update_overflows`` (the part of ``skipped_steps`` found in an
    update pass, counted at the next step), ``grad_norm``, ``loss_scale``.
    """

    def __init__(self, model, params: Iterable | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 clip_mode: str = "global", fp16: DynamicLossScaler | dict | bool | None = None,
                 stochastic_rounding: bool = False, seed: int = 0, overlap_comm: bool | None = None,
                 accumulate: bool = False, buffer_dtype: torch.dtype = torch.float32,
                 adapters: Iterable[nn.Parameter] | None = None, adapter_optimizer: dict | None = None):
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
        if buffer_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"buffer_dtype must be torch.float32, bfloat16 or float16, got {buffer_dtype}")

        self.engine = None
        if _zero.is_engine(model):
            self.attach_engine(model)
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"LOMO needs the model (nn.Module or DeepSpeedEngine), got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the module inside DistributedDataParallel: LOMO averages gradients itself")
        self.model = model
        adapters = list(adapters or ())
        if params is None:
            skip = {id(a) for a in adapters}
            params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.adapters = None
        if adapters:
            from .lora import AdapterOptimizer

            self.adapters = AdapterOptimizer(adapter_optimizer)
            self.add_param_group({"params": adapters, "lr": self.adapters.lr, "weight_decay": 0.0, "adapter": True})

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
        self.last_step_skipped = False  # the step just taken changed no parameter
        self.skipped_steps = 0      # steps skipped for a non-finite value, in any precision (see the module doc)
        self.update_overflows = 0   # of those, update passes found (one step late) to have left slices unwritten
        self._update_flags: dict[torch.device, torch.Tensor] = {}  # unwritten update slices, by weight device
        self._carried_update_flags = 0  # from a loaded state, not yet reported
        # Flags a caller raises on one rank and every rank must see together (the trainer's SIGTERM): shared at the
        # step's one sync, no collective of their own. Keys are added on every rank in the same order.
        self.shared_flags: dict[str, bool] = {}   # raised on this rank, not yet shared
        self.agreed_flags: dict[str, bool] = {}   # raised on some rank, as agreed at the last sync (sticky)
        self._phase: str | None = None
        self._norm_sq: torch.Tensor | None = None
        self._clip_coef = 1.0
        self._lr_scale = 1.0        # unscale (1 / loss scale) folded into the update
        self.hook_calls = 0         # hooks fired in the last backward pass
        self._checked = False
        self._world = 1
        self._rank = 0
        self.overlap_comm = overlap_comm
        self._overlap = False       # resolved at the first step (needs the engine and the process group)
        self._pending = None        # (param, work, finish) of the reduction in flight
        self.buffered = bool(accumulate)
        self.buffer_dtype = buffer_dtype
        self._buffers: dict[nn.Parameter, torch.Tensor] = {}  # shard gradient sums, allocated at first use
        self._touched: dict[nn.Parameter, None] = {}  # parameters with a gradient this step (ordered)
        self._loss_sum: torch.Tensor | None = None  # micro-step losses so far: non-finite if any was
        self._micro_count = 0       # micro-steps of the step under way
        self.micro_steps = 0        # micro-steps (accumulate calls and the step's own) of the last step

        self._index_groups()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]

    # ------------------------------------------------------------------ set-up
    def _index_groups(self) -> None:
        # parameter -> its group dict; rebuilt whenever torch replaces the group dicts (load_state_dict)
        self._group_of: dict[nn.Parameter, dict] = {p: g for g in self.param_groups for p in g["params"]}
        self._adapter_group = next((g for g in self.param_groups if g.get("adapter")), None)

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
        if self.buffered:  # the norm comes from the buffer
            return False
        return (self.clip_grad_norm is not None and self.clip_mode == "global") or self.loss_scaler is not None

    def accumulate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A micro-step that is not the step's last: forward, backward with each reduced shard gradient added to
        the buffer. No update and no host sync. Returns the detached loss."""
        if not self.buffered:
            raise RuntimeError("LOMO.accumulate needs LOMO(..., accumulate=True): without a buffer the update "
                               "happens inside backward")
        if closure is None:
            raise RuntimeError("LOMO.accumulate(closure): the closure runs the forward and returns the loss")
        if not self._checked:
            self._check_binding()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0  # fixed until the step
        self._lr_scale = 1.0 / scale
        loss = self._run_pass("accumulate", closure, scale).detach()
        self._loss_sum = loss.float() if self._loss_sum is None else self._loss_sum + loss.float()
        self._micro_count += 1
        return loss

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

        if self.buffered:
            return self._buffered_step(closure)
        if self.needs_norm_pass:
            rng = _rng_state()
            loss = self._run_pass("norm", closure, scale)
            norm_sq = self._sync(loss, self._norm_sq)
            if norm_sq is None:  # overflow (fp16) or a diverged loss: change nothing
                return self._skip(loss)
            self.grad_norm = math.sqrt(norm_sq)
            if self.clip_grad_norm is not None and self.clip_mode == "global":
                self._clip_coef = min(1.0, self.clip_grad_norm / (self.grad_norm + 1e-6))
            _set_rng_state(rng)  # the update pass sees the same dropout masks as the norm pass
            loss = self._run_pass("update", closure, scale)
        else:
            loss = self._run_pass("update", closure, scale, gate=True)
            if self.last_step_skipped:
                return loss.detach()
        self._step_adapters(loss.device)
        _zero.refresh_partitions(self.engine)
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self.global_step += 1
        return loss.detach()

    def _buffered_step(self, closure) -> torch.Tensor:
        """The last micro-step, then the update from the buffer: one sync of [buffer norm^2, non-finite losses]."""
        loss = self.accumulate(closure)
        losses, self._loss_sum = self._loss_sum, None
        self.micro_steps, self._micro_count = self._micro_count, 0
        try:
            norm_sq = torch.zeros((), dtype=torch.float32, device=loss.device)
            for p in self._touched:
                for gc, _ in _chunks(self._buffers[p], self._buffers[p]):
                    norm_sq += self._grad32(gc).square().sum().to(norm_sq.device)  # unscaled; inf/nan propagate
            norm_sq = self._sync(losses, norm_sq)
            if norm_sq is None:  # some micro-step overflowed (fp16) or diverged: the whole step changes nothing
                return self._skip(loss)
            self.grad_norm = math.sqrt(norm_sq)
            if self.clip_grad_norm is not None and self.clip_mode == "global":
                self._clip_coef = min(1.0, self.clip_grad_norm / (self.grad_norm + 1e-6))
            self._phase = "update"
            for p in self._touched:  # backward order: the same on every rank (the reductions already rely on it)
                g, w = self._buffers[p], _zero.local_weight(p)
                self._update_param(p, g, w, self._prepare_param(p, g, w))
            self._step_adapters(loss.device)
        finally:
            self._phase = None
            self._clear_buffers()  # after an update or a skip alike: nothing carries into the next step
        _zero.refresh_partitions(self.engine)
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self.global_step += 1
        return loss

    def _clear_buffers(self) -> None:
        for p in self._touched:
            self._buffers[p].zero_()
        self._touched.clear()

    def _run_pass(self, phase: str, closure, scale: float, gate: bool = False) -> torch.Tensor:
        self._phase = "closure"
        self.hook_calls = 0
        try:
            with torch.enable_grad():
                loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise RuntimeError("the LOMO closure must return the scalar loss tensor")
            if gate and self._sync(loss) is None:  # one pass: the backward is the update, so check first
                self._skip(loss)
                return loss
            self._phase = phase
            if phase == "norm":
                self._norm_sq = torch.zeros((), dtype=torch.float32, device=loss.device)
            with _zero.backward_allowed(self.engine):
                # The product in fp32 keeps the scaled loss finite. It cannot save an fp16 loss at scale 2^16:
                # that loss's own gradient is the scale, cast to fp16 (inf). Return the loss in fp32.
                (loss.float() * scale if scale != 1.0 else loss).backward()
            self._drain()  # the last parameter's reduction
        finally:  # also after an exception in the closure: later backward passes must not see a stale phase
            self._phase = None
            self._pending = None
        _zero.after_backward(self.engine)
        return loss

    def _sync(self, loss: torch.Tensor, norm_sq: torch.Tensor | None = None) -> float | None:
        """The step's one host sync: sum over ranks [squared norm, non-finite losses, update slices the
        previous update pass left unwritten] and read them. Returns the squared global norm (0.0 when none
        was measured), or None when the step must be skipped."""
        dev = loss.device
        if norm_sq is None or (self.engine is None and self._rank != 0):
            norm_sq = torch.zeros((), device=dev)  # replicas of a plain module hold the same norm: count it once
        flags = [float(v) for v in self.shared_flags.values()]
        vec = torch.cat([torch.stack([norm_sq.float(), (~torch.isfinite(loss.detach())).float(),
                                      self._take_update_flags(dev)]),
                         torch.tensor(flags, dtype=torch.float32).to(dev)])
        if self._world > 1:
            dist.all_reduce(vec)
        norm_sq, bad_losses, unwritten, *raised = vec.tolist()  # the one host sync of a step
        for name, count in zip(list(self.shared_flags), raised):
            self.agreed_flags[name] = self.agreed_flags.get(name, False) or count > 0
        if unwritten:  # the previous step's update pass overflowed somewhere: count it, lower the scale
            self.update_overflows += 1
            self.skipped_steps += 1
            if self.loss_scaler is not None:
                self.loss_scaler.update(True)
        if bad_losses or not math.isfinite(norm_sq):
            return None
        return norm_sq

    def _skip(self, loss: torch.Tensor) -> torch.Tensor:
        self.last_step_skipped = True
        self.skipped_steps += 1
        if self.loss_scaler is not None:  # only fp16 has a scaler to lower
            self.loss_scaler.update(True)
        return loss.detach()

    def _take_update_flags(self, device: torch.device) -> torch.Tensor:
        """The unwritten-slice count since the last read, on ``device``, and reset (stream order makes the
        read precede the reset on one device; a host flag is copied synchronously)."""
        total = torch.full((), float(self._carried_update_flags), device=device)
        self._carried_update_flags = 0
        for flag in self._update_flags.values():
            total = total + flag.to(device)
            flag.zero_()
        return total

    def _update_flag(self, device: torch.device) -> torch.Tensor:
        flag = self._update_flags.get(device)
        if flag is None:
            flag = self._update_flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        return flag

    def _check_binding(self) -> None:
        if self.engine is None and any(_zero.is_zero3_param(p) for p in self._group_of):
            raise RuntimeError("the model's parameters are ZeRO-3 partitioned but LOMO has no engine: "
                               "call optimizer.attach_engine(engine) after deepspeed.initialize")
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        overlap = self.overlap_comm
        if overlap is None:
            overlap = bool(self.engine.zero_overlap_comm()) if self.engine is not None else True
        self._overlap = overlap and self._world > 1
        if self.adapters is not None and self.adapters.optimizer is None:
            self.adapters.build(self._adapter_group["params"])  # masters of the shards, once partitioned
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
        # With overlap the previous parameter's reduction ran while backward went on; it is received (and its
        # per-parameter norm all-reduce launched) before this parameter's reduce-scatter, so that small
        # collective never queues behind a big one on the group's one NCCL stream. At most one reduction
        # (one more gradient) is in flight.
        ready = self._receive(self._pending) if self._pending is not None else None
        self._pending = self._launch(p, grad)
        del grad
        if ready is not None:
            self._apply(*ready)
        if not self._overlap:
            self._drain()

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._apply(*self._receive(pending))

    def _launch(self, p: nn.Parameter, grad: torch.Tensor):
        """Start averaging ``grad`` over the ranks. Divided before the sum, as DeepSpeed does: a sum of
        loss-scaled fp16 gradients overflows where their mean does not."""
        if _zero.is_zero3_param(p):
            world = _zero.group_world_size(p)
            if world > 1:
                grad.div_(world)
            work, finish = _zero.reduce_to_shard(p, grad, async_op=self._overlap)
        else:
            world = self._world
            work = None
            if world > 1:  # replicas must apply the same averaged gradient, never drift apart
                grad.div_(world)
                work = dist.all_reduce(grad, async_op=self._overlap)
            finish = lambda g=grad, w=p.data: (g, w)  # noqa: E731
        return p, work, finish

    def _receive(self, pending):
        """Wait for a reduction (NCCL: the compute stream waits, the host does not) and, for per-parameter
        clipping, launch the all-reduce of the shard's squared norm. The norm is taken on the gradient's
        device, before any host copy (offload_param): NCCL needs device tensors."""
        p, work, finish = pending
        if work is not None:
            work.wait()
        g, w = finish()  # a shard that is all padding is empty; it still takes part in the collectives
        ctx = self._prepare_param(p, g, w) if self._phase == "update" else None
        return p, g, w, ctx

    def _apply(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor, ctx) -> None:
        if self._phase == "accumulate":
            buf = self._buffers.get(p)
            if buf is None:  # the shard's real elements (padding excluded), where the shard lives
                buf = self._buffers[p] = torch.zeros(g.shape, dtype=self.buffer_dtype, device=g.device)
            buf.add_(g)
            self._touched[p] = None
            return
        if self._phase == "norm":
            for gc, _ in _chunks(g, w):  # non-finite values (fp16 overflow) propagate into the sum
                self._norm_sq += self._grad32(gc).square().sum()
            return
        self._update_param(p, g, w, ctx)

    # ------------------------------------------------------------------ LoRA adapters (lora.py)
    def _is_adapter(self, p: nn.Parameter) -> bool:
        return self._group_of[p] is self._adapter_group

    def _prepare_param(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor):
        # adapters take SGD's preparation (the per-parameter norm) whatever the rule: their update is the
        # adapter optimizer's
        return LOMO._prepare(self, p, g, w) if self._is_adapter(p) else self._prepare(p, g, w)

    def _update_param(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor, ctx) -> None:
        if not self._is_adapter(p):
            self._apply_update(p, g, w, ctx)
            return
        coef = self._norm_coef(ctx)
        g = self._grad32(g) * self._clip_coef
        self.adapters.grad_of(p).copy_(g * coef if coef is not None else g)

    def _step_adapters(self, device: torch.device) -> None:
        """After the update pass: step the adapters. Their gradients' finiteness is agreed over the ranks and read
        here (LoRA's one extra host sync per step); a non-finite one leaves the adapters and their optimizer state
        as they were and is counted, at the next step's sync, as an update pass that overflowed."""
        if self.adapters is None:
            return
        bad = self.adapters.bad_count(device)
        if self._world > 1:
            dist.all_reduce(bad)
        if bad.item():
            self.adapters.discard()
            self._update_flag(device).add_(1.0)
            return
        self.adapters.step(self._adapter_group["lr"], self._write)

    # ------------------------------------------------------------------ the update rule (SGD; AdaLomo overrides)
    # An update rule is two methods: ``_prepare`` runs when a parameter's reduced shard arrives and may launch
    # small collectives over its partition group (async with overlap, in the same order on every rank);
    # ``_apply_update`` waits for them and writes the shard, through ``_write``.
    def _prepare(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor):
        """Per-parameter clipping: launch the all-reduce of the shard's squared norm."""
        if self.clip_grad_norm is None or self.clip_mode != "per_param":
            return None
        # _chunks yields at least one slice (an all-padding shard: an empty one, summing to a 0 tensor)
        norm_sq = sum(self._grad32(gc).square().sum() for gc, _ in _chunks(g, w))
        return norm_sq, self._all_reduce(p, norm_sq)

    def _all_reduce(self, p: nn.Parameter, t: torch.Tensor):
        """Sum ``t`` in place over ``p``'s partition group (a no-op for a replicated parameter); the handle to
        wait on, or None."""
        if _zero.is_zero3_param(p) and _zero.group_world_size(p) > 1:
            return dist.all_reduce(t, group=_zero.partition_group(p), async_op=self._overlap)
        return None

    def _norm_coef(self, norm) -> torch.Tensor | None:
        """Per-parameter clipping's factor from ``_prepare``'s launched norm (a tensor: no host sync)."""
        if norm is None:
            return None
        norm_sq, norm_work = norm
        if norm_work is not None:
            norm_work.wait()
        return (self.clip_grad_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)

    def _apply_update(self, p: nn.Parameter, g: torch.Tensor, w: torch.Tensor, norm) -> None:
        coef = self._norm_coef(norm)
        group = self._group_of[p]
        for gc, wc in _chunks(g, w):
            gc = self._grad32(gc)
            if coef is not None:
                gc = gc * coef
            self._update(wc, _to_weight_device(gc, wc), group["lr"], group["weight_decay"])

    def _grad32(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient in fp32, unscaled (it was averaged over ranks before the reduction), clamped by value
        when asked."""
        g = g.float()
        if self._lr_scale != 1.0:
            g = g * self._lr_scale
        if self.clip_grad_value is not None and self._phase == "update":
            g = g.clamp(-self.clip_grad_value, self.clip_grad_value)
        return g

    def _update(self, w: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> None:
        """``w <- w (1 - lr wd) - lr clip g`` in fp32, written back only if the whole result is finite in
        ``w``'s dtype (an fp16 value above 65504 is not); otherwise ``w`` is left as it was and the update
        flag counts the slice. Decided on the device: no host sync."""
        alpha = -lr * self._clip_coef
        # out of place, so that a non-finite result can be discarded; an fp32 weight takes one op instead of a
        # clone and an op (one pass less over the shard)
        if w.dtype != torch.float32:
            new = w.float()
            if wd:
                new.mul_(1.0 - lr * wd)
            new.add_(g, alpha=alpha)
        elif wd:
            new = torch.mul(w, 1.0 - lr * wd).add_(g, alpha=alpha)
        else:
            new = torch.add(w, g, alpha=alpha)
        self._write(w, new)

    def _write(self, w: torch.Tensor, new: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Write the fp32 result ``new`` (a temporary, reused) into ``w``: rounded to ``w``'s dtype (stochastically
        for bf16 when asked), and only if all of it is finite there and ``ok`` (a device bool) holds; otherwise
        ``w`` keeps its values and the update flag counts the slice."""
        if new.dtype != w.dtype:
            out = torch.empty_like(w)
            if self.stochastic_rounding and w.dtype == torch.bfloat16:
                stochastic_round_to_bf16_(out, new, self._generator(w.device))
            else:
                out.copy_(new)
            new = out
        finite = all_finite(new)
        ok = finite if ok is None else finite & ok
        self._update_flag(w.device).add_(~ok)
        torch.where(ok, new, w, out=w)  # element-wise, so writing into an input is safe

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
            "skipped_steps": self.skipped_steps,
            "update_overflows": self.update_overflows,
            # flags of the last update pass, not yet read: a read here is a host sync, once per checkpoint
            "unreported_update_flags": int(sum(f.item() for f in self._update_flags.values())) + self._carried_update_flags,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }
        if self.adapters is not None:
            if self.adapters.optimizer is None:
                self._check_binding()
            state["lomo"]["adapters"] = self.adapters.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lomo", None) or {}
        super().load_state_dict(state_dict)
        self._index_groups()
        self.global_step = int(extra.get("global_step", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.update_overflows = int(extra.get("update_overflows", 0))
        self._carried_update_flags = int(extra.get("unreported_update_flags", 0))
        for flag in self._update_flags.values():
            flag.zero_()
        if extra.get("loss_scaler") is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(extra["loss_scaler"])
        for dev, gen_state in (extra.get("generators") or {}).items():
            self._generator(torch.device(dev)).set_state(gen_state)
        if self.adapters is not None:
            if self.adapters.optimizer is None:
                self._check_binding()
            saved = extra.get("adapters")
            if saved is None or not self.adapters.load_state_dict(saved):
                self.adapters.build(self._adapter_group["params"])
                warnings.warn("the LoRA adapters' optimizer state was not restored (" +
                              ("none was saved" if saved is None else "saved on another number of ranks") +
                              "): it starts afresh from the current adapter weights")

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the gradient buffer (accumulate=True; allocated at the first micro-step), 0 without one."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def state_bytes(self) -> int:
        """Bytes of the per-parameter optimizer state (AdaLomo's factored second moments and step counts; SGD has
        none). The adapters' optimizer is not counted."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    @property
    def loss_scale(self) -> float | None:
        return self.loss_scaler.scale if self.loss_scaler is not None else None


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``t`` is finite, as a device bool (no host sync). One read of ``t``: ``aminmax``
    propagates NaN and meets any infinity as its min or max; ``isfinite(t).all()`` costs ~13x more on CPU."""
    if t.numel() == 0:  # aminmax refuses an empty tensor (an all-padding shard)
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return lo.isfinite() & hi.isfinite()


def _chunks(g: torch.Tensor, w: torch.Tensor):
    """Matching slices of gradient and weight (flattened), at most UPDATE_CHUNK elements each."""
    n = g.numel()
    if n <= UPDATE_CHUNK or not w.is_contiguous():
        yield g, w
        return
    g, w = g.reshape(-1), w.view(-1)
    for start in range(0, n, UPDATE_CHUNK):
        yield g[start:start + UPDATE_CHUNK], w[start:start + UPDATE_CHUNK]


def _to_weight_device(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient slice where its weight lives. With offload_param the shard is on the host: a blocking
    copy, since the update reads it on the host at once. Everything that feeds a collective is computed
    before this copy, on the gradient's device."""
    return g if g.device == w.device else g.to(w.device)


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
