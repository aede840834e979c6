"""LOMOTrainer: ``transformers.Trainer`` with LOMO's fused update, on DeepSpeed ZeRO-3 or a plain module.

Swap ``Trainer`` for ``LOMOTrainer``; keep TrainingArguments, datasets, collators, callbacks and
``report_to``. With ``TrainingArguments(deepspeed="configs/zero3_bf16.json")`` accelerate builds a ZeRO-3 engine
*without* an optimizer and each rank updates its own shard inside backward; without DeepSpeed the module is trained
directly (gradients averaged across processes when launched with torchrun).

The stock training loop (``Trainer.train``) runs; LOMOTrainer fills its overridable points:
- ``create_optimizer`` builds nothing: accelerate then gives DeepSpeed no optimizer (its own would allocate fp32
  partitions and gradient buffers);
- ``create_scheduler``, called once the engine exists, builds LOMO on it and the schedule on LOMO, and hands the loop
  ``FusedStep``: LOMO seen from the loop, whose ``step()`` has nothing left to do and which reports a skipped step,
  so the schedule waits for a step that updated;
- ``training_step`` runs LOMO's step (``accumulate`` on a micro-batch that is not a step's last) with the forward as
  its closure; a step whose batches hold no target token is LOMO's empty step (decided at its one sync);
- ``log`` adds LOMO's numbers; a callback stops a diverged run and saves on SIGTERM;
- checkpoints are LOMO's (checkpoint.py; the stock private methods replaced are in ``_hf.StockLoopHooks``): the
  model folder (loadable by ``from_pretrained``) plus the scheduler, LOMO's state and RNG, nothing pickled, written
  to ``checkpoint-N.tmp`` and renamed, so a crash never destroys the previous one.
Callbacks, logging, evaluation and save strategies, the best model, rotation and data skipping on resume are the
stock Trainer's. ``LOMOTrainer.wrap(SFTTrainer)`` gives another Trainer subclass (TRL's SFTTrainer and DPOTrainer,
Seq2SeqTrainer) LOMO's update, its own overrides kept in front. The DeepSpeed config is read from
``TrainingArguments.deepspeed`` or accelerate's DeepSpeed plugin (``accelerate launch`` with it in the YAML only); a
plain process with DeepSpeed runs as a world of one.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from . import _hf, _zero, checkpoint, clip_choice, lora
from .checkpoint import PREFIX as CKPT_PREFIX, last_checkpoint
from .config import LOMOArguments, engine_config, refuse_removed_keywords, validate
from .errors import ConfigError, Interrupted, TrainingDiverged
from .local_ranks import single_process_env
from .optim import all_finite
from .optim.factory import build_optimizer
from .ranks import raise_agreed, world
from .schedulers import deepspeed_scheduler
from .trainer_checkpoints import CheckpointMethods, write_error

logger = logging.getLogger(__name__)

try:  # on a CPU-only machine DeepSpeed would compile an inference-only op at start-up: skip it
    _zero.disable_cpu_shm_build()
except ImportError:
    pass


class FusedStep:
    """LOMO as the stock loop sees it. The update already ran inside ``training_step``'s backward, so ``step()`` and
    ``zero_grad()`` have nothing left to do; ``step_was_skipped`` tells accelerate, and through it the stock loop,
    to leave the lr schedule alone after a skipped step (as DeepSpeed does), an empty one included (no target
    token: ``LOMO.last_step_empty``). Everything else is LOMO's."""

    def __init__(self, lomo):
        self.lomo = lomo

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None

    @property
    def step_was_skipped(self) -> bool:
        return self.lomo.last_step_skipped

    def state_dict(self) -> dict:
        return self.lomo.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.lomo.load_state_dict(state_dict)

    def __getattr__(self, name):
        if name == "lomo":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.lomo, name)


class LOMOTrainer(_hf.StockLoopHooks, CheckpointMethods, Trainer):
    """An HF Trainer whose optimizer is LOMO. ``lomo_args`` (LOMOArguments, or a dict of its fields) gives LOMO's
    own settings. ``lomo_optimizer`` is LOMO itself, ``optimizer`` its ``FusedStep``."""

    def __init__(self, model=None, args=None, *pos, lomo_args: LOMOArguments | dict | None = None, **kwargs):
        refuse_removed_keywords(kwargs)
        if lomo_args is None:  # given to a wrapped class (LOMOTrainer.wrap), whose own __init__ runs first
            lomo_args = self.__dict__.pop("_lomo_args_given", None)
        if args is None:
            raise ConfigError("LOMOTrainer needs TrainingArguments (args=...)")
        if kwargs.get("optimizers", (None, None)) != (None, None) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ConfigError("optimizers=(...) / optimizer_cls_and_kwargs cannot be combined with LOMOTrainer: LOMO "
                              "is the optimizer")
        # TrainingArguments.deepspeed, else accelerate's DeepSpeed plugin (accelerate launch with only a YAML)
        self._ds_config, self._ds_config_source = _hf.deepspeed_config_source(args)
        if self._ds_config is None and isinstance(model, torch.nn.Module) and \
                any(_zero.is_zero3_param(p) for p in model.parameters()):
            raise ConfigError("the model's parameters are ZeRO-3 partitioned (built under deepspeed.zero.Init) but no "
                              "DeepSpeed config was found: pass TrainingArguments(deepspeed=\"ds_config.json\") "
                              "(--deepspeed), or launch with accelerate launch --config_file CONFIG.yaml holding "
                              "distributed_type: DEEPSPEED and deepspeed_config_file")
        self.lomo_settings = validate(self._ds_config, args, lomo_args)  # before any process group
        for message in self.lomo_settings.warnings:
            logger.warning(message)
        if self._ds_config is not None:
            _world_of_one_without_launcher()
        # LOMO + LoRA: a lora block, or a peft LoRA model passed in; the base weights become trainable (LOMO's)
        self.lora = self.lomo_settings.lora is not None or lora.is_peft_model(model)
        if self.lora:
            model = lora.prepare_model(model, self.lomo_settings.lora)
        self._engine_config = None  # what accelerate will pass to deepspeed.initialize (the planner reads it too)
        if self._ds_config is not None:
            self._engine_config = engine_config(self._ds_config, args, args.world_size,
                                                model=model if isinstance(model, torch.nn.Module) else None)
            _hf.set_deepspeed_config(args, self._engine_config)
        super().__init__(model, args, *pos, **kwargs)
        if self.is_deepspeed_enabled and self._ds_config is None:
            raise ConfigError("DeepSpeed is enabled but LOMOTrainer found no DeepSpeed config: pass "
                              "TrainingArguments(deepspeed=\"ds_config.json\") (--deepspeed), or a deepspeed_config_file "
                              "in accelerate's YAML")
        self._freeze_reference()
        self.lomo_optimizer = None
        self._tokens, self._log_time, self._consecutive_skips = None, 0.0, 0
        self._finite_losses = None  # micro-steps with a finite loss since the last log (device count)
        self._stop_signal = None  # SIGTERM or SIGINT once received
        self._first_seq_len = None  # the first batch's length, for the planner (check_memory, clip_mode "auto")
        self.add_callback(_FusedControl(self))

    def _freeze_reference(self) -> None:
        """A reference model (TRL's DPOTrainer; under ZeRO-3 an inference-only partitioned engine, as DPOTrainer
        prepares it) is never LOMO's: it holds no gradients, and LOMO's hooks are only on the trained model. A wrapped
        class may set it after its ``super().__init__``: checked again there and when LOMO is built."""
        reference = getattr(self, "ref_model", None)
        if isinstance(reference, torch.nn.Module) and reference is not self.model:
            reference.requires_grad_(False)

    @classmethod
    def wrap(cls, trainer_cls: type) -> type:
        """``trainer_cls`` (any ``transformers.Trainer`` subclass: TRL's SFTTrainer or DPOTrainer, Seq2SeqTrainer, your
        own) with LOMO's update: ``LOMOTrainer.wrap(SFTTrainer)(model=..., args=..., train_dataset=...,
        lomo_args=...)`` takes the wrapped class's arguments, plus ``lomo_args``. The wrapped class comes first in
        the method order, so its overrides (``compute_loss``, ``training_step``, ``log``, ``_save_checkpoint``...)
        wrap LOMOTrainer's, which stand where the stock Trainer's stood. One class per ``trainer_cls``."""
        if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
            raise ConfigError(f"LOMOTrainer.wrap needs a transformers.Trainer subclass, got {trainer_cls!r}")
        if issubclass(trainer_cls, LOMOTrainer):
            return trainer_cls
        if trainer_cls not in _WRAPPED:
            def __init__(self, *pos, lomo_args: LOMOArguments | dict | None = None, **kwargs):
                self._lomo_args_given = lomo_args  # read by LOMOTrainer.__init__, reached through trainer_cls's
                args = kwargs.get("args", pos[1] if len(pos) > 1 else None)
                if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
                    _world_of_one_without_launcher()  # before trainer_cls loads a model under zero.Init
                trainer_cls.__init__(self, *pos, **kwargs)
                self._freeze_reference()

            name = f"LOMO{trainer_cls.__name__}"
            members = {"__init__": __init__, "__module__": trainer_cls.__module__, "__qualname__": name,
                       "__doc__": f"{trainer_cls.__name__} with LOMO's fused update (LOMOTrainer.wrap)."}
            if trainer_cls.create_model_card is not Trainer.create_model_card:  # its own card (TRL's): name LOMO in it
                def create_model_card(self, *pos, **kwargs):
                    trainer_cls.create_model_card(self, *pos, **kwargs)
                    self._name_optimizer_in_card()

                members["create_model_card"] = create_model_card
            if hasattr(trainer_cls, "_tag_names"):  # TRL's hub tags
                members["_tag_names"] = [*trainer_cls._tag_names, "lomo"]
            _WRAPPED[trainer_cls] = type(name, (trainer_cls, cls), members)
        return _WRAPPED[trainer_cls]

    # ------------------------------------------------------------------ set-up
    def create_optimizer(self, model=None):
        """Nothing yet: LOMO needs the engine, which accelerate builds next from the model alone."""
        if not self.is_deepspeed_enabled:
            s = self.lomo_settings
            if s.fp16 is not None:  # no fp32 master copy: weights live in the training dtype, as under DeepSpeed
                self.model.half()
            elif s.bf16:
                self.model.to(torch.bfloat16)
            self.model.to(self.args.device)
            _hf.keep_unwrapped(self.model)
            if self.accelerator.scaler is not None:  # LOMO scales the loss itself; no GradScaler may touch it
                self.accelerator.scaler = torch.amp.GradScaler(self.args.device.type, enabled=False)
        self.optimizer = None
        return None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Called by the stock loop once the engine exists: LOMO on it, then the schedule (DeepSpeed's block, else
        TrainingArguments') on LOMO's param groups."""
        if self.lomo_optimizer is not None:  # a second train(): the old hooks would update twice
            self.lomo_optimizer.remove_hooks()
        self._freeze_reference()
        target = _hf.deepspeed_engine(self) if self.is_deepspeed_enabled else self.model
        self._check_loaded_weights()
        self.lomo_optimizer = lomo = self.make_optimizer(target)
        lomo.shared_flags["stop"] = False  # SIGTERM on any rank (every rank adds it: one slot each)
        self.optimizer = FusedStep(lomo)
        _hf.report_skipped_steps(self.accelerator, self.optimizer)
        if self.is_deepspeed_enabled:
            _hf.register_engine(self.accelerator, target)
        self.lr_scheduler = None
        if self.lomo_settings.scheduler is not None:
            self.lr_scheduler = deepspeed_scheduler(self.lomo_settings.scheduler, lomo, num_training_steps, self.args)
        else:
            super().create_scheduler(num_training_steps, optimizer=lomo)
        return self.lr_scheduler

    def make_optimizer(self, target):
        """LOMO (or AdaLomo) on the ZeRO-3 engine or the plain module, as the settings say; clip_mode "auto" is
        decided here, from the planner (clip_choice.py), the same on every rank, and logged in one line."""
        if self.lomo_settings.clip_mode == "auto":
            s, args = self.lomo_settings, self.args
            from .bench.planner import plan_clip_mode

            choice = plan_clip_mode(getattr(self.model, "config", None), args.device.type, self._first_seq_len,
                                    buffer_dtype=s.auto_buffer_dtype, optimizer=s.optimizer, **self._planner_inputs())
            choice = clip_choice.agree(choice, args.device)
            if self.is_world_process_zero():
                logger.info(choice.line())
            self.lomo_settings = clip_choice.resolve(s, choice)
        return build_optimizer(self.lomo_settings, target, **self._adapter_kwargs())

    def _adapter_kwargs(self) -> dict:
        if not self.lora:
            return {}
        block = self.lomo_settings.lora or {}
        if self.is_world_process_zero():
            logger.info(lora.describe(self.model))
        return {"adapters": lora.adapter_parameters(self.model), "adapter_optimizer": block.get("optimizer")}

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if trial is not None:
            raise ConfigError("hyperparameter search is not supported by LOMOTrainer")
        # one run per output_dir: a second one would overwrite this one's checkpoints (and remove its .tmp below)
        error = None
        if self.args.should_save:
            try:
                checkpoint.lock_output_dir(self.args.output_dir)
            except ConfigError as e:
                error = e
        raise_agreed(error)
        # resume=True: the newest *whole* checkpoint (the stock Trainer takes the newest folder)
        resume_from_checkpoint = checkpoint.resolve(resume_from_checkpoint, self.args.output_dir)
        if self.args.should_save and os.path.isdir(self.args.output_dir):
            for path in checkpoint.remove_unfinished(self.args.output_dir):
                logger.warning(f"removed {path}: a save that never finished")
        s = self.lomo_settings
        if self.args.device.type == "cuda" and (s.check_memory or s.clip_mode == "auto"):
            self._first_seq_len = _first_seq_len(self.get_train_dataloader())
        if s.check_memory:
            self._check_memory()
        self._tokens, self._log_time, self._finite_losses, self._stop_signal = None, time.time(), None, None
        previous = {sig: _install_signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)
        except _StopInEvaluation:  # every rank at once (agreed between evaluation batches)
            saved = os.path.join(self.args.output_dir, f"{CKPT_PREFIX}{self.state.global_step}")
            if self.state.global_step > 0 and not os.path.isdir(saved):
                self.save_lomo_checkpoint()
            raise self._interrupted(saved if self.state.global_step > 0 else None) from None
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: forward (twice with global-norm clipping or fp16) and backward with LOMO's update inside,
        nothing left to step afterwards. On the step's last micro-batch (the stock loop sets ``sync_gradients``)
        LOMO updates; before it, it only adds the gradient to its buffer. The loss is weighed as in the stock
        ``training_step`` (``num_items_in_batch``: the label tokens of all ranks and micro-batches). Returns the
        detached loss."""
        module = self.model  # the bare module: ZeRO-3's gather hooks live on it, and the engine refuses our backward
        module.train()
        inputs = _hf.prepare_inputs(self, inputs)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None

        calls = 0

        def closure():
            nonlocal calls
            calls += 1
            saved = _hf.metric_state(self) if calls > 1 else None  # a repeated forward: count its metrics once
            loss = self.compute_loss(module, inputs, num_items_in_batch=num_items_in_batch)
            if saved is not None:
                _hf.restore_metric_state(self, saved)
            return loss if scaled else loss / self.current_gradient_accumulation_steps

        lomo = self.lomo_optimizer
        # Nothing to learn from, and 0/0 is no divergence: LOMO's empty step, uncounted. A device flag that LOMO reads
        # at the step's one sync (a host read here would be one more sync per micro-batch); known only after it.
        empty = self._no_target(num_items_in_batch)
        if self.accelerator.sync_gradients:
            loss = lomo.step(closure, empty=empty)
            if lomo.last_step_empty:
                logger.warning(f"step {self.state.global_step + 1}: no target token in its batches on any rank "
                               "(every label is -100): skipped; it changes nothing and is not a non-finite step")
        else:
            loss = lomo.accumulate(closure)  # an empty step's buffer is discarded at its step
        if torch.is_tensor(empty):  # no loss to report for an empty step, whatever the loss makes of 0 items
            loss = loss.masked_fill(empty.to(loss.device), float("nan"))
        elif empty:
            loss = torch.full_like(loss, float("nan"))
        finite = torch.isfinite(loss).to(torch.float32)
        self._finite_losses = finite if self._finite_losses is None else self._finite_losses + finite
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        return loss

    def _no_target(self, num_items_in_batch) -> torch.Tensor | bool | None:
        """Whether the step's batches hold no target token on any rank: a bool tensor where the count is one (never
        read here), a bool where it is a number. Known only where the count is the global one (the stock loop sums it
        over the ranks with average_tokens_across_devices, or there is one rank); None where it is not."""
        if num_items_in_batch is None or not (self.args.average_tokens_across_devices or world() == 1):
            return None
        if torch.is_tensor(num_items_in_batch):
            return num_items_in_batch.sum() == 0
        return num_items_in_batch == 0

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The stock batches; none once ``max_steps`` is reached. The stock loop checks it only after a step
        (trainer_callback.py:592), so a run resumed from its last checkpoint would take one step more."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def floating_point_ops(self, inputs) -> int:
        """The stock estimate (6 x tokens x non-embedding parameters), counting ZeRO-3 parameters at full size."""
        model, main = self.model, getattr(self.model, "main_input_name", "input_ids")
        if self.deepspeed is None or main not in inputs:
            return super().floating_point_ops(inputs)
        embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
        params = sum(_zero.full_numel(p) for n, p in model.named_parameters() if n not in embeddings)
        return 6 * inputs[main].numel() * params

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """A training row gets LOMO's numbers: its grad norm (only when measured), loss scale, skipped steps, the
        lr the next step uses, tokens/s and peak memory since the last row (one sync, on every rank)."""
        if "loss" in logs and self.lomo_optimizer is not None:
            opt = self.lomo_optimizer
            tokens = (self._tokens if self._tokens is not None else torch.zeros(())).float().to(self.args.device)
            finite = (self._finite_losses if self._finite_losses is not None else torch.zeros(())).to(tokens)
            counts = torch.stack([tokens, finite])
            if dist.is_initialized():
                dist.all_reduce(counts)
            tokens, finite = counts[0], counts[1]
            if finite.item() == 0:  # every step since the last row was skipped: there is no loss to report
                logs["loss"] = float("nan")
            self._finite_losses = None
            logs["learning_rate"] = opt.param_groups[0]["lr"]
            if opt.adapters is not None:
                logs["adapter_learning_rate"] = opt.param_groups[-1]["lr"]
            logs.pop("grad_norm", None)  # the stock loop's: measured on gradients LOMO has already consumed
            if opt.grad_norm is not None:
                logs["grad_norm"] = opt.grad_norm
            if opt.loss_scale is not None:
                logs["loss_scale"] = opt.loss_scale
            logs["skipped_steps"] = opt.skipped_steps  # in every precision: a silent skip hides a divergence
            logs["tokens_per_second"] = round(tokens.item() / max(time.time() - self._log_time, 1e-9), 1)
            logs["peak_memory_gb"] = round(_peak_memory_gb(self.args.device), 3)
            self._tokens, self._log_time = None, time.time()
        super().log(logs, start_time)

    def _check_divergence(self, skipped: bool) -> None:
        """Stop after ``max_consecutive_skips`` steps in a row that changed nothing because the loss or a gradient
        was non-finite. With fp16, overflows count only once the loss scale is at its minimum: before that,
        lowering the scale is the cure, as DeepSpeed's scaler sees it."""
        scaler = self.lomo_optimizer.loss_scaler
        if skipped and (scaler is None or scaler.scale <= scaler.min_loss_scale):
            self._consecutive_skips += 1
        elif not skipped:
            self._consecutive_skips = 0
        if self._consecutive_skips >= self.lomo_settings.max_consecutive_skips:
            self.log({"loss": _hf.pending_train_loss(self)})  # the stock loop would log this step after counting it
            last = last_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"training diverged: {self._consecutive_skips} steps in a row (up to step {self.state.global_step + 1})"
                " had a non-finite loss or gradient and were skipped; lower learning_rate or clip (max_grad_norm), "
                + (f"then resume from {last}" if last else "then start again"))

    def _on_stop_signal(self, signum, frame):
        """SIGTERM or Ctrl-C: stop at the next step's sync (or between evaluation batches) on every rank, save what
        was trained since the last checkpoint, and exit 128 + signal with one line. A second Ctrl-C stops now."""
        first = self._stop_signal is None
        self._stop_signal = signum
        if self.lomo_optimizer is None or (signum == signal.SIGINT and not first):
            raise self._interrupted(None)
        self.lomo_optimizer.shared_flags["stop"] = True  # shared at the next step's sync

    def _interrupted(self, saved: str | None) -> Interrupted:
        signum = self._stop_signal or signal.SIGTERM
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        last = saved or last_checkpoint(self.args.output_dir)
        return Interrupted(128 + signum, f"stopped by {name} at step {self.state.global_step}: "
                           + (f"saved {saved}" if saved else "nothing new to save")
                           + (f"; resume with --resume_from_checkpoint {last}" if last else ""))

    def _planner_inputs(self) -> dict:
        """This run as the planner sees it (GPU memory: 0 off a GPU); the model and sequence length apart."""
        s, args = self.lomo_settings, self.args
        cuda = args.device.type == "cuda"
        return dict(gpus=world() if self.is_deepspeed_enabled else 1,  # without ZeRO-3 every rank holds it all
                    gpu_mem_bytes=torch.cuda.get_device_properties(args.device).total_memory if cuda else 0,
                    batch=args.per_device_train_batch_size, dtype="fp16" if s.fp16 else "bf16" if s.bf16 else "fp32",
                    activation_checkpointing=bool(getattr(args, "activation_checkpointing", None)
                                                  or getattr(args, "gradient_checkpointing", False)),
                    ds_config=self._engine_config)  # "auto" gathering limits filled as DeepSpeed gets them

    def _check_memory(self) -> None:
        """check_memory (asked for, never by default): refuse, before the engine is built, a setting the planner
        predicts does not fit this GPU. The sequence length is the first batch's. clip_mode "auto" is checked as
        two passes: it takes the buffer only within a stricter margin."""
        from .bench.planner import check_fits

        s, args = self.lomo_settings, self.args
        if args.device.type != "cuda" or self._first_seq_len is None:
            why = "not on a GPU" if args.device.type != "cuda" else "no input_ids in the first batch"
            logger.warning(f"check_memory: {why}, nothing checked")
            return
        mode = "lomo_accum" if s.accumulation_dtype else s.optimizer
        try:
            line = check_fits(self.model.config, mode=mode, seq_len=self._first_seq_len,
                              accum_dtype=s.accumulation_dtype or "fp32", **self._planner_inputs())
        except ValueError as e:
            if str(e).startswith("check_memory"):
                raise ConfigError(str(e)) from None
            logger.warning(f"check_memory: {e}; nothing checked")
            return
        logger.info(f"check_memory: {line}")

    def create_model_card(self, *args, **kwargs):
        """The stock model card, naming the optimizer that ran (the stock one names ``args.optim``, AdamW)."""
        history = self.state.log_history
        # evaluate() without DeepSpeed adds a timing key that engine evaluations lack: the card's table
        # needs the same keys in every row
        self.state.log_history = [{k: v for k, v in h.items() if k != "eval_model_preparation_time"} for h in history]
        try:
            super().create_model_card(*args, **kwargs)
        finally:
            self.state.log_history = history
        self._name_optimizer_in_card()

    def _name_optimizer_in_card(self) -> None:
        """Put LOMO's line in ``output_dir/README.md``: in place of the stock card's ``- optimizer:`` entry, or, in a
        card without one (TRL's template), as a section of its own."""
        path = os.path.join(self.args.output_dir, "README.md")
        if not (self.is_world_process_zero() and os.path.isfile(path)):
            return
        with open(path) as f:
            lines = f.read().split("\n")
        s = self.lomo_settings
        text = (f"- optimizer: {'AdaLomo' if s.optimizer == 'adalomo' else 'LOMO'} (fused into backward, "
                f"lomo_trainer), weight_decay={s.weight_decay}, clip_grad_norm={s.clip_grad_norm} ({s.clip_mode}), "
                f"clip_grad_value={s.clip_grad_value}")
        if self.lora:
            adapters = self.lomo_optimizer.adapters
            extra = "".join(f", {k}={v}" for k, v in adapters.kwargs.items())
            text += (f"; LoRA adapters by {adapters.cls.__name__} (lr={adapters.lr}{extra}), merged into the saved "
                     f"weights (the adapters alone: {lora.ADAPTER_FOLDER}/)")
        start = next((i for i, line in enumerate(lines) if line.startswith("- optimizer:")), None)
        if start is not None:  # the stock entry may run over several lines (its optimizer args)
            end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("- ") or not lines[j]),
                       len(lines))
            lines[start:end] = [text]
        else:
            lines += ["", "## Optimizer", "", text, ""]
        with open(path, "w") as f:
            f.write("\n".join(lines))

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a ``from_pretrained`` folder (safetensors, config, tokenizer). Collective under ZeRO-3.

        LOMO + LoRA: the folder holds the plain model with the adapters merged into their base weights, and
        ``adapter/`` the adapters alone as a peft folder. A checkpoint keeps the base weights unmerged instead (what
        resuming needs, exactly): ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt),
        ckpt + "/adapter")`` is the model as trained."""
        output_dir = output_dir or self.args.output_dir
        self._check_finite_weights(output_dir)
        if self.deepspeed is not None:
            state_dict = _zero.consolidated_state_dict(self.deepspeed)
        else:
            state_dict = self.model.state_dict()
        model = self.model
        if self.lora:
            state_dict, adapters = lora.split_state_dict(self.model, state_dict or {})  # empty off rank 0 (ZeRO-3)
            if not _internal_call:
                lora.merge_into(self.model, state_dict, is_main=self.args.should_save)
            model = self.model.get_base_model()
        error = None
        if self.args.should_save:
            try:
                os.makedirs(output_dir, exist_ok=True)
                model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
                if self.lora:
                    lora.save_adapter(self.model, os.path.join(output_dir, lora.ADAPTER_FOLDER), adapters)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            except Exception as e:  # noqa: BLE001 - a failed write, whatever library wrapped it
                error = write_error(e, f"the model to {output_dir}")
        raise_agreed(error)  # every rank stops with the same line

    def _check_loaded_weights(self) -> None:
        """Before the first step: NaN or inf in the weights as loaded would only surface later as a "diverged" run.
        One reduction of a flag per parameter (over the ranks' shards) names the first bad tensor."""
        named = [(n, _zero.local_data(p)) for n, p in self.model.named_parameters()]
        if not named:
            return
        flags = torch.stack([all_finite(t).to(self.args.device) for _, t in named]).float()
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad = (flags == 0).nonzero()
        if bad.numel():
            raise ConfigError(f"the model's weight {named[int(bad[0])][0]} holds NaN or inf as loaded, before any "
                              "step: the weights are corrupt (or saved from a diverged run); load other weights")

    def _check_finite_weights(self, where: str) -> None:
        """Refuse to save non-finite weights (collective: one flag all-reduced over the ranks' shards)."""
        params = [_zero.local_data(p) for p in self.model.parameters()]
        ok = torch.stack([all_finite(t) for t in params]).all() if params else torch.tensor(True)
        ok = ok.float().to(self.args.device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise TrainingDiverged(f"the model has non-finite weights at step {self.state.global_step}: not saving "
                                   f"it to {where}; lower learning_rate or clip (max_grad_norm) and resume from an "
                                   "earlier checkpoint")


_WRAPPED: dict[type, type] = {}


def _world_of_one_without_launcher() -> None:
    """A plain ``python train.py`` with DeepSpeed: a world of one, as lomo-train sets it up, or DeepSpeed's first
    ``init_distributed`` (zero.Init while loading, or ``deepspeed.initialize``) falls back to MPI discovery."""
    if single_process_env():
        logger.info("no launcher found: running DeepSpeed as a world of one process")


class _FusedControl(TrainerCallback):
    """LOMO's part of the loop's control, at the stock callback points: a diverged run stops before the step is
    counted, and a SIGTERM, once every rank knows of it (at the next step's one sync), saves and exits."""

    def __init__(self, trainer: LOMOTrainer):
        self.trainer, self.skips = trainer, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.skips = self.trainer.lomo_optimizer.skipped_steps

    def on_optimizer_step(self, args, state, control, **kwargs):
        lomo = self.trainer.lomo_optimizer
        # skipped_steps also counts an update pass found non-finite, reported at the next step's sync
        counted = lomo.skipped_steps > self.skips
        if lomo.last_step_empty and not counted:  # no target token: neither a skip nor an update
            return
        self.trainer._check_divergence(counted)

    def on_prediction_step(self, args, state, control, **kwargs):
        """Between evaluation batches during training: a SIGTERM must not wait for the whole evaluation. One small
        all-reduce per batch makes every rank stop at the same batch."""
        lomo = self.trainer.lomo_optimizer
        if lomo is None or self.trainer._stop_signal is None and not dist.is_initialized():
            return
        flag = torch.tensor([1.0 if lomo.shared_flags.get("stop") else 0.0], device=args.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            if self.trainer._stop_signal is None:
                self.trainer._stop_signal = signal.SIGTERM  # another rank's signal
            raise _StopInEvaluation()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.lomo_optimizer.agreed_flags.get("stop"):
            control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.lomo_optimizer.agreed_flags.get("stop"):
            if self.trainer._stop_signal is None:
                self.trainer._stop_signal = signal.SIGTERM  # another rank's signal
            error = self.trainer._interrupted(os.path.join(args.output_dir, f"{CKPT_PREFIX}{state.global_step}"))
            logger.warning(error.message)
            raise error


class _StopInEvaluation(Exception):
    """Raised between evaluation batches on every rank once one of them got SIGTERM or Ctrl-C."""


def _first_seq_len(train_dl) -> int | None:
    """The first batch's sequence length, drawn without moving any RNG: training then draws the same batches. None
    when it has no ``input_ids`` (the planner then plans nothing)."""
    state = checkpoint.rng_states()
    try:
        return next(iter(train_dl))["input_ids"].shape[-1]
    except (KeyError, TypeError, IndexError, AttributeError, StopIteration):
        return None
    finally:
        checkpoint.set_rng_states(state)


def _install_signal(signum, handler):
    """Install ``handler`` for ``signum``; returns the previous one, or None off the main thread (no signals)."""
    try:
        return signal.signal(signum, handler)
    except ValueError:
        return None


def _peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
