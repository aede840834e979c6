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
  its closure;
- ``log`` adds LOMO's numbers; a callback stops a diverged run and saves on SIGTERM;
- checkpoints are LOMO's (checkpoint.py; the stock private methods replaced are in ``_hf.StockLoopHooks``): the
  model folder (loadable by ``from_pretrained``) plus the scheduler, LOMO's state and RNG, nothing pickled, written
  to ``checkpoint-N.tmp`` and renamed, so a crash never destroys the previous one.
Callbacks, logging, evaluation and save strategies, the best model, rotation and data skipping on resume are the
stock Trainer's, and LOMO mixes into another Trainer subclass (``class X(LOMOTrainer, SFTTrainer)``).
"""
from __future__ import annotations

import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from . import _hf, _zero, checkpoint, clip_choice, lora
from .checkpoint import LOMO_STATE, PREFIX as CKPT_PREFIX, SCHEDULER, TRAINER_STATE, last_checkpoint  # noqa: F401
from .config import LOMOArguments, engine_config, load_json, refuse_removed_keywords, validate
from .errors import ConfigError, TrainingDiverged
from .optim import all_finite
from .optim.factory import build_optimizer
from .schedulers import deepspeed_scheduler

logger = logging.getLogger(__name__)

try:  # on a CPU-only machine DeepSpeed would compile an inference-only op at start-up: skip it
    _zero.disable_cpu_shm_build()
except ImportError:
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class FusedStep:
    """LOMO as the stock loop sees it. The update already ran inside ``training_step``'s backward, so ``step()`` and
    ``zero_grad()`` have nothing left to do; ``step_was_skipped`` tells accelerate, and through it the stock loop,
    to leave the lr schedule alone after a skipped step (as DeepSpeed does). Everything else is LOMO's."""

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


class LOMOTrainer(_hf.StockLoopHooks, Trainer):
    """An HF Trainer whose optimizer is LOMO. ``lomo_args`` (LOMOArguments, or a dict of its fields) gives LOMO's
    own settings. ``lomo_optimizer`` is LOMO itself, ``optimizer`` its ``FusedStep``."""

    def __init__(self, model=None, args=None, *pos, lomo_args: LOMOArguments | dict | None = None, **kwargs):
        refuse_removed_keywords(kwargs)
        if args is None:
            raise ConfigError("LOMOTrainer needs TrainingArguments (args=...)")
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ConfigError("optimizers=(...) cannot be combined with LOMOTrainer: LOMO is the optimizer")
        self._ds_config = load_json(args.deepspeed) if args.deepspeed else None
        self.lomo_settings = validate(self._ds_config, args, lomo_args)  # before any process group
        for message in self.lomo_settings.warnings:
            logger.warning(message)
        # LOMO + LoRA: a lora block, or a peft LoRA model passed in; the base weights become trainable (LOMO's)
        self.lora = self.lomo_settings.lora is not None or lora.is_peft_model(model)
        if self.lora:
            model = lora.prepare_model(model, self.lomo_settings.lora)
        self._engine_config = None  # what accelerate will pass to deepspeed.initialize (the planner reads it too)
        if self._ds_config is not None:
            self._engine_config = engine_config(self._ds_config, args, args.world_size, model=model)
            _hf.set_deepspeed_config(args, self._engine_config)
        super().__init__(model, args, *pos, **kwargs)
        if self.is_deepspeed_enabled and self._ds_config is None:
            raise ConfigError("LOMOTrainer reads the DeepSpeed config from TrainingArguments(deepspeed=...): pass "
                              "--deepspeed CONFIG.json (accelerate launch's deepspeed_config_file alone is not read)")
        self.lomo_optimizer = None
        self._tokens, self._log_time, self._consecutive_skips = None, 0.0, 0
        self._first_seq_len = None  # the first batch's length, for the planner (check_memory, clip_mode "auto")
        self.add_callback(_FusedControl(self))

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
        target = _hf.deepspeed_engine(self) if self.is_deepspeed_enabled else self.model
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
        self._tokens, self._log_time = None, time.time()
        previous = _install_sigterm(self._on_sigterm)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

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

        def closure():
            loss = self.compute_loss(module, inputs, num_items_in_batch=num_items_in_batch)
            return loss if scaled else loss / self.current_gradient_accumulation_steps

        lomo = self.lomo_optimizer
        loss = (lomo.step if self.accelerator.sync_gradients else lomo.accumulate)(closure)
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The stock batches; none once ``max_steps`` is reached. The stock loop checks it only after a step (trainer_callback.py:592), so a
        run resumed from its last checkpoint would take one step more."""
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
            if dist.is_initialized():
                dist.all_reduce(tokens)
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

    def _on_sigterm(self, signum, frame):
        if self.lomo_optimizer is None:  # nothing trained yet, nothing to save
            raise SystemExit(128 + signal.SIGTERM)
        self.lomo_optimizer.shared_flags["stop"] = True  # shared at the next step's sync

    def _planner_inputs(self) -> dict:
        """This run as the planner sees it (GPU memory: 0 off a GPU); the model and sequence length apart."""
        s, args = self.lomo_settings, self.args
        cuda = args.device.type == "cuda"
        return dict(gpus=_world() if self.is_deepspeed_enabled else 1,  # without ZeRO-3 every rank holds it all
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
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.isfile(path):
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
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            if self.lora:
                lora.save_adapter(self.model, os.path.join(output_dir, lora.ADAPTER_FOLDER), adapters)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        _barrier()

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

    def save_lomo_checkpoint(self) -> None:
        """``checkpoint-N``, as the stock ``_save_checkpoint`` does it but LOMO's: the model folder, each rank's LOMO
        state and RNG, the scheduler and TrainerState; written as ``.tmp``, with a manifest last, then renamed."""
        args = self.args
        self.store_flos()
        final = os.path.join(args.output_dir, f"{CKPT_PREFIX}{self.state.global_step}")
        tmp = checkpoint.begin_save(final, args.should_save)
        _barrier()
        self.save_model(tmp, _internal_call=True)
        checkpoint.save_rank_state(tmp, _rank(), self.lomo_optimizer.state_dict())
        best = os.path.join(args.output_dir, f"{CKPT_PREFIX}{self.state.best_global_step}")
        if args.metric_for_best_model and self.state.best_global_step and \
                (self.state.best_global_step == self.state.global_step or os.path.isdir(best)):
            self.state.best_model_checkpoint = best  # as the stock Trainer records it, before the state is saved
        if args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(tmp, SCHEDULER))
            for cb in self.callback_handler.callbacks + [self.control]:  # as stock: early stopping's patience etc.
                if isinstance(cb, ExportableState):
                    name, saved = type(cb).__name__, self.state.stateful_callbacks
                    if isinstance(saved.get(name), list):
                        saved[name].append(cb.state())
                    else:
                        saved[name] = cb.state()
            self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))
        _barrier()
        if args.should_save:
            checkpoint.finish_save(tmp, final, world_size=_world(), global_batch=self._global_batch())
            checkpoint.rotate(args.output_dir, args.save_total_limit, self.state.best_model_checkpoint)
        _barrier()

    def _global_batch(self) -> int:
        return self.args.per_device_train_batch_size * _world() * self.lomo_settings.gradient_accumulation_steps

    # ------------------------------------------------------------------ loading
    def load_lomo_checkpoint(self, folder: str) -> None:
        """Weights, scheduler and LOMO state from ``folder`` (a LOMOTrainer checkpoint), or weights and schedule
        from a stock Trainer checkpoint; the stock loop has read its TrainerState. Nothing is unpickled."""
        checkpoint.load_weights(self.model, folder, self.lora)
        _zero.refresh_partitions(self.deepspeed)
        if checkpoint.kind(folder) == "hf":  # its AdamW state means nothing to SGD
            checkpoint.load_stock_scheduler(folder, self.lr_scheduler, len(self.lomo_optimizer.param_groups),
                                            self.state.global_step)
            logger.warning(f"{folder} is a stock Trainer checkpoint: resuming its weights, step "
                           f"{self.state.global_step} and lr schedule; its optimizer state and RNG are not used by LOMO")
            return
        info = checkpoint.run_info(folder)
        if info and (info.get("world_size"), info.get("global_batch")) != (_world(), self._global_batch()):
            seen = self.state.global_step * info["global_batch"]
            logger.warning(f"{folder} was written by {info['world_size']} processes with a global batch of "
                           f"{info['global_batch']}; this run has {_world()} and {self._global_batch()}. The data "
                           f"position is counted in steps: resuming at step {self.state.global_step} starts at sample "
                           f"{self.state.global_step * self._global_batch()} of the epoch order, not {seen}.")
        self.lomo_optimizer.load_state_dict(checkpoint.load_rank_state(folder, _rank())["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint.load_state(os.path.join(folder, SCHEDULER)))

    def load_rng_state(self, folder: str | None) -> None:
        """This rank's RNG states, where the stock loop restores them (the stock files are pickled: not read)."""
        if folder is not None and checkpoint.kind(folder) != "hf":
            checkpoint.set_rng_states(checkpoint.load_rank_state(folder, _rank())["rng"])

    def load_best_weights(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info(f"loading the best model from {best} ({self.args.metric_for_best_model} = {self.state.best_metric})")
        checkpoint.load_weights(self.model, best, self.lora)
        _zero.refresh_partitions(self.deepspeed)


class _FusedControl(TrainerCallback):
    """LOMO's part of the loop's control, at the stock callback points: a diverged run stops before the step is
    counted, and a SIGTERM, once every rank knows of it (at the next step's one sync), saves and exits."""

    def __init__(self, trainer: LOMOTrainer):
        self.trainer, self.skips = trainer, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.skips = self.trainer.lomo_optimizer.skipped_steps

    def on_optimizer_step(self, args, state, control, **kwargs):
        # skipped_steps also counts an update pass found non-finite, reported at the next step
        self.trainer._check_divergence(self.trainer.lomo_optimizer.skipped_steps > self.skips)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.lomo_optimizer.agreed_flags.get("stop"):
            control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.lomo_optimizer.agreed_flags.get("stop"):
            logger.warning(f"SIGTERM: saved {CKPT_PREFIX}{state.global_step}, exiting")
            raise SystemExit(128 + signal.SIGTERM)


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


def _install_sigterm(handler):
    """Install ``handler`` for SIGTERM; returns the previous one, or None off the main thread (no signals)."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
