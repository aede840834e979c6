"""The fused engine: every update happens inside backward (LOMO, LOw-Memory Optimization, arXiv 2306.09782).

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

An empty step (``step(closure, empty=flag)``, ``flag`` a device bool the caller computed, e.g. "no target token in
this step's batches"): the flag is all-reduced and read at the step's one sync, so the caller never reads it on the
host. If it is set on any rank, the step changes nothing (weights, rule state, fp16 scale; an accumulation buffer is
cleared) and is not counted: ``last_step_skipped`` and ``last_step_empty`` are True, ``skipped_steps`` stays. Its
loss may be non-finite (0/0): that is no divergence.

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

What an update does is a rule's (``rules.py``: SGD, the default; ``adalomo.py``; ``adapters.py`` for LOMO + LoRA's
adapters, ``adapters=``); this engine owns the hooks, the reductions, the passes, the step's host sync and the skip
accounting, and hands each reduced shard to the pass's sink (``sinks.py``). Clipping is ``clipping.py``'s.

Host synchronisations: exactly one per step, in every mode: the ``.item()``-like read of a few
all-reduced numbers (global norm, loss finiteness, the previous update pass's flag, the step's empty flag) after
the norm pass,
or after the forward in the one-pass modes; LOMO + LoRA adds one after backward (the adapters' gradients must be
finite before their optimizer steps). None per parameter, except with ``offload_param``, where each
reduced gradient slice is copied to the host for the host-side update (the host waits for that copy).
``_zero.refresh_partitions`` does not synchronise.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .. import _zero
from ..loss_scaler import DynamicLossScaler
from .clipping import Clipping
from .rules import SGD, StepContext, UpdateRule
from .sinks import GradientBuffer, NormSink, UpdateSink
from .tensors import GuardedWriter

_IN_CLOSURE = object()  # the sink while the closure runs: a backward there is a user error


class LOMO(torch.optim.Optimizer):
    """Fused updates over a module, a DeepSpeed ZeRO-3 engine, or parameter groups of a module.

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
        adapters: LoRA adapter parameters of ``model`` (LOMO + LoRA): their gradients are averaged, unscaled and
            clipped like the others (the global norm covers both sets), then ``adapter_optimizer`` (a
            ``{"type": "AdamW", "params": {...}}`` dict) steps them after backward (``adapters.py``). They form the
            second param group, whose lr is the adapter optimizer's, so schedulers drive it too.
        rule: the update rule of every group but the adapters' (``rules.UpdateRule``); default ``SGD()``.

    Attributes read by the trainer: ``global_step`` (steps that updated), ``skipped_steps`` (steps skipped
    for a non-finite loss or gradient, in any precision; saved in ``state_dict``), ``last_step_skipped``
    (the step just taken changed nothing), ``last_step_empty`` (it was an empty step: not counted),
    ``update_overflows`` (the part of ``skipped_steps`` found in an update pass, counted at the next step),
    ``grad_norm``, ``loss_scale``, and ``shared_flags`` / ``agreed_flags`` (flags a caller raises on one rank and
    every rank sees after the next step's sync).
    """

    def __init__(self, model, params: Iterable | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 clip_mode: str = "global", fp16: DynamicLossScaler | dict | bool | None = None,
                 stochastic_rounding: bool = False, seed: int = 0, overlap_comm: bool | None = None,
                 accumulate: bool = False, buffer_dtype: torch.dtype = torch.float32,
                 adapters: Iterable[nn.Parameter] | None = None, adapter_optimizer: dict | None = None,
                 rule: UpdateRule | None = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.clipping = Clipping(clip_grad_norm, clip_grad_value, clip_mode)
        if buffer_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"buffer_dtype must be torch.float32, bfloat16 or float16, got {buffer_dtype}")
        self._buffer = GradientBuffer(buffer_dtype) if accumulate else None

        self.engine = None
        if _zero.is_engine(model):
            self.attach_engine(model)
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"LOMO needs the model (nn.Module or DeepSpeedEngine), got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the module inside DistributedDataParallel: LOMO averages gradients itself")
        self.model = model
        self.rule = rule if rule is not None else SGD()
        adapters = list(adapters or ())
        if params is None:
            skip = {id(a) for a in adapters}
            params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **self.rule.defaults))
        for group in self.param_groups:
            self.rule.validate_group(group)
        self._adapter_rule = None
        if adapters:
            from .adapters import AdapterRule

            self._adapter_rule = AdapterRule(adapter_optimizer)
            self.add_param_group({"params": adapters, "lr": self._adapter_rule.optimizer.lr, "weight_decay": 0.0,
                                  "adapter": True})

        if fp16 is True:
            fp16 = DynamicLossScaler()
        elif isinstance(fp16, dict):
            fp16 = DynamicLossScaler.from_ds_config(fp16)
        self.loss_scaler: DynamicLossScaler | None = fp16 or None
        self.writer = GuardedWriter(stochastic_rounding, seed)
        self._step = StepContext(self, self.clipping, self.writer)

        self.global_step = 0        # steps that updated the parameters
        self.grad_norm: float | None = None  # global norm of the last step, when it was measured
        self.last_step_skipped = False  # the step just taken changed no parameter
        self.last_step_empty = False    # ... because the caller marked it empty (not counted in skipped_steps)
        self._empty: torch.Tensor | bool | None = None  # the step's empty flag, read at its sync
        self.skipped_steps = 0      # steps skipped for a non-finite value, in any precision (see the module doc)
        self.update_overflows = 0   # of those, update passes found (one step late) to have left slices unwritten
        self._carried_update_flags = 0  # from a loaded state, not yet reported
        # Flags a caller raises on one rank and every rank must see together (the trainer's SIGTERM): shared at the
        # step's one sync, no collective of their own. Keys are added on every rank in the same order.
        self.shared_flags: dict[str, bool] = {}   # raised on this rank, not yet shared
        self.agreed_flags: dict[str, bool] = {}   # raised on some rank, as agreed at the last sync (sticky)
        self._sink = None           # where the hooks send reduced shards: None outside a pass
        self.hook_calls = 0         # hooks fired in the last backward pass
        self._bound = False
        self._world = 1
        self._rank = 0
        self.overlap_comm = overlap_comm
        self._overlap = False       # resolved at the first step (needs the engine and the process group)
        self._pending = None        # (param, work, finish) of the reduction in flight
        self._loss_sum: torch.Tensor | None = None  # micro-step losses so far: non-finite if any was
        self._micro_count = 0       # micro-steps of the step under way
        self.micro_steps = 0        # micro-steps (accumulate calls and the step's own) of the last step

        self._index_groups()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._rule_of]

    # ------------------------------------------------------------------ set-up
    def _index_groups(self) -> None:
        # parameter -> its group dict and rule; rebuilt whenever torch replaces the group dicts (load_state_dict)
        self._group_of: dict[nn.Parameter, dict] = {}
        self._rule_of: dict[nn.Parameter, UpdateRule] = {}
        for g in self.param_groups:
            rule = self._adapter_rule if g.get("adapter") else self.rule
            for p in g["params"]:
                self._group_of[p], self._rule_of[p] = g, rule
        self._rules = list(dict.fromkeys(self._rule_of.values()))

    def group_of(self, p: nn.Parameter) -> dict:
        return self._group_of[p]

    def rules(self) -> list[UpdateRule]:
        """Every rule in use, once each, in param-group order."""
        return self._rules

    def attach_engine(self, engine) -> None:
        """Bind the ZeRO-3 engine that partitions this module (if the module was passed before
        ``deepspeed.initialize``). Parameter objects are the same, so the hooks stay valid."""
        if engine is not None:
            _zero.check_engine(engine)
        self.engine = engine
        self._bound = False

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _bind(self) -> None:
        if self.engine is None and any(_zero.is_zero3_param(p) for p in self._rule_of):
            raise RuntimeError("the model's parameters are ZeRO-3 partitioned but LOMO has no engine: "
                               "call optimizer.attach_engine(engine) after deepspeed.initialize")
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        overlap = self.overlap_comm
        if overlap is None:
            overlap = bool(self.engine.zero_overlap_comm()) if self.engine is not None else True
        self._overlap = overlap and self._world > 1
        self._step.overlap, self._step.world = self._overlap, self._world
        for rule in self.rules():
            rule.bind([p for p, r in self._rule_of.items() if r is rule])
        self._bound = True

    # ------------------------------------------------------------------ the step
    @property
    def needs_norm_pass(self) -> bool:
        if self._buffer is not None:  # the norm comes from the buffer
            return False
        return self.clipping.is_global or self.loss_scaler is not None

    def accumulate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A micro-step that is not the step's last: forward, backward with each reduced shard gradient added to
        the buffer. No update and no host sync. Returns the detached loss. Whether the step is empty is the step's
        own argument: an empty step discards what its micro-steps buffered."""
        if self._buffer is None:
            raise RuntimeError("LOMO.accumulate needs LOMO(..., accumulate=True): without a buffer the update "
                               "happens inside backward")
        if closure is None:
            raise RuntimeError("LOMO.accumulate(closure): the closure runs the forward and returns the loss")
        if not self._bound:
            self._bind()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0  # fixed until the step
        self.clipping.unscale = 1.0 / scale
        loss = self._run_pass(self._buffer, closure, scale).detach()
        self._loss_sum = loss.float() if self._loss_sum is None else self._loss_sum + loss.float()
        self._micro_count += 1
        return loss

    def step(self, closure: Callable[[], torch.Tensor] | None = None,  # type: ignore[override]
             empty: torch.Tensor | bool | None = None) -> torch.Tensor:
        """One step (the last micro-step with ``accumulate=True``). ``empty``: a scalar bool, on any rank true when the
        step has nothing to learn from; decided at the step's one sync (see the module doc), never read before."""
        if closure is None:
            raise RuntimeError("LOMO updates inside backward: call optimizer.step(closure) with a closure that "
                               "runs the forward and returns the loss (it must not call backward).")
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        self.clipping.begin_step(scale)
        self.grad_norm = None
        self.last_step_skipped = self.last_step_empty = False
        self._empty = empty  # set at every step: one that raised before its sync leaves nothing stale
        if not self._bound:
            self._bind()

        if self._buffer is not None:
            return self._buffered_step(closure)
        update = UpdateSink(self._rule_of.__getitem__, self._step)
        if self.needs_norm_pass:
            rng = _rng_state()
            norm = NormSink(self.clipping)
            loss = self._run_pass(norm, closure, scale)
            norm_sq = self._sync(loss, norm.total)
            if norm_sq is None:  # overflow (fp16) or a diverged loss: change nothing
                return self._skip(loss)
            self._set_norm(norm_sq)
            _set_rng_state(rng)  # the update pass sees the same dropout masks as the norm pass
            loss = self._run_pass(update, closure, scale)
        else:
            loss = self._run_pass(update, closure, scale, gate=True)
            if self.last_step_skipped:
                return loss.detach()
        self._finish_rules(loss.device)
        self._commit()
        return loss.detach()

    def _buffered_step(self, closure) -> torch.Tensor:
        """The last micro-step, then the update from the buffer: one sync of [buffer norm^2, non-finite losses]."""
        loss = self.accumulate(closure)
        losses, self._loss_sum = self._loss_sum, None
        self.micro_steps, self._micro_count = self._micro_count, 0
        buffer = self._buffer
        try:
            norm_sq = self._sync(losses, buffer.norm_sq(self.clipping, loss.device))
            if norm_sq is None:  # some micro-step overflowed (fp16) or diverged: the whole step changes nothing
                return self._skip(loss)
            self._set_norm(norm_sq)
            update = UpdateSink(self._rule_of.__getitem__, self._step)
            for p in buffer.touched:  # backward order: the same on every rank (the reductions already rely on it)
                g, w = buffer.buffers[p], _zero.local_weight(p)
                update.apply(p, g, w, update.prepare(p, g, w))
            self._finish_rules(loss.device)
        finally:
            buffer.clear()  # after an update or a skip alike: nothing carries into the next step
        self._commit()
        return loss

    def _set_norm(self, norm_sq: float) -> None:
        self.grad_norm = math.sqrt(norm_sq)
        self.clipping.set_global_norm(self.grad_norm)

    def _finish_rules(self, device: torch.device) -> None:
        self._step.device = device
        for rule in self.rules():
            rule.finish(self._step)

    def _commit(self) -> None:
        """A step that updated: make the new shards visible to the next forward, and count it."""
        _zero.refresh_partitions(self.engine)
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self.global_step += 1

    def _run_pass(self, sink, closure, scale: float, gate: bool = False) -> torch.Tensor:
        self._sink = _IN_CLOSURE
        self.hook_calls = 0
        try:
            with torch.enable_grad():
                loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise RuntimeError("the LOMO closure must return the scalar loss tensor")
            if gate and self._sync(loss) is None:  # one pass: the backward is the update, so check first
                self._skip(loss)
                return loss
            sink.start(loss.device)
            self._sink = sink
            with _zero.backward_allowed(self.engine):
                # The product in fp32 keeps the scaled loss finite. It cannot save an fp16 loss at scale 2^16:
                # that loss's own gradient is the scale, cast to fp16 (inf). Return the loss in fp32.
                (loss.float() * scale if scale != 1.0 else loss).backward()
            self._drain()  # the last parameter's reduction
        finally:  # also after an exception in the closure: later backward passes must not see a stale sink
            self._sink = None
            self._pending = None
        _zero.after_backward(self.engine)
        return loss

    def _sync(self, loss: torch.Tensor, norm_sq: torch.Tensor | None = None) -> float | None:
        """The step's one host sync: sum over ranks [squared norm, non-finite losses, update slices the
        previous update pass left unwritten, ranks that marked the step empty, shared flags] and read them. Returns
        the squared global norm (0.0 when none was measured), or None when the step must be skipped."""
        dev = loss.device
        if norm_sq is None or (self.engine is None and self._rank != 0):
            norm_sq = torch.zeros((), device=dev)  # replicas of a plain module hold the same norm: count it once
        flags = [float(v) for v in self.shared_flags.values()]
        unwritten = self.writer.take_flags(dev, self._carried_update_flags)
        self._carried_update_flags = 0
        empty, self._empty = self._empty, None
        # always a slot (0 when not given): every rank's vector has the same length
        empty = torch.zeros((), device=dev) if empty is None else \
            torch.as_tensor(empty).to(dev, torch.float32).reshape(())
        vec = torch.cat([torch.stack([norm_sq.float(), (~torch.isfinite(loss.detach())).float(), unwritten, empty]),
                         torch.tensor(flags, dtype=torch.float32).to(dev)])
        if self._world > 1:
            dist.all_reduce(vec)
        norm_sq, bad_losses, unwritten, empty, *raised = vec.tolist()  # the one host sync of a step
        for name, count in zip(list(self.shared_flags), raised):
            self.agreed_flags[name] = self.agreed_flags.get(name, False) or count > 0
        if unwritten:  # the previous step's update pass overflowed somewhere: count it, lower the scale
            self.update_overflows += 1
            self.skipped_steps += 1
            if self.loss_scaler is not None:
                self.loss_scaler.update(True)
        if empty:  # before the finiteness checks: an empty step's loss is often 0/0, which is no divergence
            self.last_step_empty = True
            return None
        if bad_losses or not math.isfinite(norm_sq):
            return None
        return norm_sq

    def _skip(self, loss: torch.Tensor) -> torch.Tensor:
        self.last_step_skipped = True
        if self.last_step_empty:  # nothing to learn from is no failure: not counted, the fp16 scale stays
            return loss.detach()
        self.skipped_steps += 1
        if self.loss_scaler is not None:  # only fp16 has a scaler to lower
            self.loss_scaler.update(True)
        return loss.detach()

    # ------------------------------------------------------------------ the hook (hot path)
    def _hook(self, p: nn.Parameter) -> None:
        sink = self._sink
        if sink is None:
            return  # a backward outside LOMO.step (e.g. evaluation code): leave p.grad as torch would
        if sink is _IN_CLOSURE:
            raise RuntimeError("the LOMO closure must not call backward(): return the loss, LOMO runs backward itself")
        self.hook_calls += 1
        grad, p.grad = p.grad, None
        # With overlap the previous parameter's reduction ran while backward went on; it is received (and its
        # rule's small collectives launched) before this parameter's reduce-scatter, so that a small collective
        # never queues behind a big one on the group's one NCCL stream. At most one reduction (one more gradient)
        # is in flight.
        ready = self._receive(self._pending) if self._pending is not None else None
        self._pending = self._launch(p, grad)
        del grad
        if ready is not None:
            sink.apply(*ready)
        if not self._overlap:
            self._drain()

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._sink.apply(*self._receive(pending))

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
        """Wait for a reduction (NCCL: the compute stream waits, the host does not) and let the sink prepare (a
        rule may launch small collectives, computed on the gradient's device: NCCL needs device tensors)."""
        p, work, finish = pending
        if work is not None:
            work.wait()
        g, w = finish()  # a shard that is all padding is empty; it still takes part in the collectives
        return p, g, w, self._sink.prepare(p, g, w)

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
            "unreported_update_flags": self.writer.pending() + self._carried_update_flags,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "generators": {str(d): g.get_state() for d, g in self.writer.generators.items()},
        }
        for rule in self._stateful_rules():
            state["lomo"][rule.name] = rule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader would cast fp32 rule state to the parameters' dtype (bf16): it is restored as saved."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("lomo", None) or {}
        saved = state_dict.pop("state", {}) or {}
        super().load_state_dict({**state_dict, "state": {}})
        self._index_groups()
        self.state.clear()
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(ids, [p for g in self.param_groups for p in g["params"]]):
            if i in saved:
                self.state[p] = {k: v.clone() for k, v in saved[i].items()}
        self.global_step = int(extra.get("global_step", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.update_overflows = int(extra.get("update_overflows", 0))
        self._carried_update_flags = int(extra.get("unreported_update_flags", 0))
        self.writer.reset_flags()  # the flags of steps before the load are the saved ones
        if extra.get("loss_scaler") is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(extra["loss_scaler"])
        for dev, gen_state in (extra.get("generators") or {}).items():
            self.writer.generator(torch.device(dev)).set_state(gen_state)
        for rule in self._stateful_rules():
            rule.load_state_dict(extra.get(rule.name))

    def _stateful_rules(self) -> list[UpdateRule]:
        rules = [r for r in self.rules() if r.name is not None]
        if rules and not self._bound:  # their state (the adapters' masters) exists once bound
            self._bind()
        return rules

    @property
    def adapters(self):
        """LOMO + LoRA: the adapters' ``AdapterOptimizer`` (its torch optimizer, masters, lr); None without."""
        return self._adapter_rule.optimizer if self._adapter_rule is not None else None

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the gradient buffer (accumulate=True; allocated at the first micro-step), 0 without one."""
        return self._buffer.nbytes if self._buffer is not None else 0

    @property
    def buffered(self) -> bool:
        return self._buffer is not None

    @property
    def buffer_dtype(self) -> torch.dtype | None:
        return self._buffer.dtype if self._buffer is not None else None

    @property
    def state_bytes(self) -> int:
        """Bytes of the per-parameter optimizer state (AdaLomo's factored second moments and step counts; SGD has
        none). The adapters' optimizer is not counted."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    @property
    def loss_scale(self) -> float | None:
        return self.loss_scaler.scale if self.loss_scaler is not None else None

    @property
    def clip_grad_norm(self) -> float | None:
        return self.clipping.max_norm

    @property
    def clip_grad_value(self) -> float | None:
        return self.clipping.max_value

    @property
    def clip_mode(self) -> str:
        return self.clipping.mode

    @property
    def stochastic_rounding(self) -> bool:
        return self.writer.stochastic_rounding


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
