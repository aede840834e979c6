"""LOMOTrainer: ``transformers.Trainer`` with LOMO's fused update, on DeepSpeed ZeRO-3 or a plain module.

Swap ``Trainer`` for ``LOMOTrainer``; keep TrainingArguments, datasets, collators, callbacks and
``report_to``. With ``TrainingArguments(deepspeed="configs/zero3_bf16.json")`` DeepSpeed builds a ZeRO-3
engine *without* an optimizer and each rank updates its own shard inside backward; without DeepSpeed the
module is trained directly (gradients averaged across processes when launched with torchrun).

The training loop is LOMOTrainer's own (the stock loop's backward/step/clip sequence is exactly what LOMO
replaces), built from the Trainer's public parts: dataloaders, ``compute_loss``, callbacks and logging,
TrainerState, ``evaluate``. Checkpoints are LOMO's own too: LOMO has no optimizer state and no fp32 master
copy, so a checkpoint is the model folder (loadable by ``from_pretrained``) plus the scheduler, loss scaler,
RNG and data position; it is written to ``checkpoint-N.tmp`` and renamed, so a crash never destroys the
previous one. SIGTERM saves a checkpoint once every rank knows of it (at the next step's sync), then exits.
"""
from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerState
from transformers.trainer_utils import SaveStrategy, TrainOutput, speed_metrics

from . import _hf, _zero, checkpoint, lora
from .checkpoint import LOMO_STATE, PREFIX as CKPT_PREFIX, SCHEDULER, TRAINER_STATE, last_checkpoint  # noqa: F401
from .config import LOMOArguments, engine_config, load_json, refuse_removed_keywords, validate
from .errors import ConfigError, TrainingDiverged
from .optim import LOMO, all_finite
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


class LOMOTrainer(Trainer):
    """An HF Trainer whose optimizer is LOMO. ``lomo_args`` (LOMOArguments, or a dict of its fields) gives LOMO's
    own settings."""

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
        _hf.strip_deepspeed_optimizer(args)
        super().__init__(model, args, *pos, **kwargs)
        self._tokens = None
        self._consecutive_skips = 0

    # ------------------------------------------------------------------ set-up
    def create_optimizer(self, model=None):
        return self.optimizer  # built in _setup_lomo, once the engine exists

    def _setup_lomo(self, max_steps: int):
        s, args = self.lomo_settings, self.args
        if isinstance(self.optimizer, LOMO):  # a second train(): the old hooks would update twice
            self.optimizer.remove_hooks()
        if self._ds_config is not None:
            import deepspeed

            engine = self.deepspeed
            if engine is None:
                world = dist.get_world_size() if dist.is_initialized() else 1
                cfg = engine_config(self._ds_config, args, world, model=self.model)
                engine, *_ = deepspeed.initialize(model=self.model, config=cfg)
                self.model_wrapped = self.deepspeed = engine
                _hf.register_engine(self.accelerator, engine)
            self.optimizer = build_optimizer(s, engine, **self._adapter_kwargs())
            model = engine
        else:
            if s.fp16 is not None:  # no fp32 master copy: weights live in the training dtype, as under DeepSpeed
                self.model.half()
            elif s.bf16:
                self.model.to(torch.bfloat16)
            self.model.to(args.device)
            self.optimizer = build_optimizer(s, self.model, **self._adapter_kwargs())
            model = self.model_wrapped = self.model
        if s.scheduler is not None:
            self.lr_scheduler = deepspeed_scheduler(s.scheduler, self.optimizer, max_steps, args)
        else:
            self.lr_scheduler = None
            self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        return model

    def _adapter_kwargs(self) -> dict:
        if not self.lora:
            return {}
        block = self.lomo_settings.lora or {}
        if self.is_world_process_zero():
            logger.info(lora.describe(self.model))
        return {"adapters": lora.adapter_parameters(self.model), "adapter_optimizer": block.get("optimizer")}

    # ------------------------------------------------------------------ one step
    def training_step(self, model, inputs, num_items_in_batch=None, last_micro_step: bool = True):
        """One fused LOMO step on one batch: forward (twice with global-norm clipping or fp16), backward with
        the update inside, nothing left to step afterwards. Returns the detached loss. ``num_items_in_batch``
        (the label tokens of the global batch: all ranks and accumulation steps) makes the loss the global token
        mean, as in the stock Trainer. With gradient accumulation each micro-batch but the last only adds its
        gradient to LOMO's buffer (``last_micro_step=False``)."""
        module = self.model  # forward through the bare module: ZeRO-3's gather hooks live on it
        module.train()
        inputs = self._prepare_inputs(inputs)
        micro_steps = getattr(self, "current_gradient_accumulation_steps", 1)

        def closure():
            loss = self.compute_loss(module, inputs, num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is None and micro_steps > 1:  # no token count: the stock Trainer's mean
                loss = loss / micro_steps
            return loss

        loss = (self.optimizer.step if last_micro_step else self.optimizer.accumulate)(closure)
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        return loss

    def floating_point_ops(self, inputs) -> int:
        """The stock estimate (6 x tokens x non-embedding parameters), counting ZeRO-3 parameters at full size."""
        model, main = self.model, getattr(self.model, "main_input_name", "input_ids")
        if self.deepspeed is None or main not in inputs:
            return super().floating_point_ops(inputs)
        embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
        params = sum(_zero.full_numel(p) for n, p in model.named_parameters() if n not in embeddings)
        return 6 * inputs[main].numel() * params

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if trial is not None:
            raise ConfigError("hyperparameter search is not supported by LOMOTrainer")
        args = self.args
        resume_from_checkpoint = checkpoint.resolve(resume_from_checkpoint, args.output_dir)
        if args.should_save and os.path.isdir(args.output_dir):
            for path in checkpoint.remove_unfinished(args.output_dir):
                logger.warning(f"removed {path}: a save that never finished")
        self.is_in_train = True
        train_dl = self.get_train_dataloader()
        gas = self.lomo_settings.gradient_accumulation_steps
        if len(train_dl) == 0:
            raise ConfigError("the training set yields no batch: check the dataset and per_device_train_batch_size")
        # as the stock Trainer: an epoch's last step takes the remaining micro-batches
        steps_per_epoch = -(-len(train_dl) // gas)
        last_micro_batches = len(train_dl) - (steps_per_epoch - 1) * gas
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        self._enable_activation_checkpointing()
        if self.lomo_settings.check_memory:
            self._check_memory(train_dl)
        model = self._setup_lomo(max_steps)
        self.optimizer.shared_flags["stop"] = False  # SIGTERM on any rank (every rank adds it: one slot each)

        self.state = TrainerState(stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control]
                                                      if hasattr(cb, "state") and callable(cb.state)])
        self.state.max_steps, self.state.num_train_epochs = max_steps, num_epochs
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(args, max_steps)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        if resume_from_checkpoint:
            self._load_checkpoint(resume_from_checkpoint)
            self.state.max_steps, self.state.num_train_epochs = max_steps, num_epochs  # this run's, as stock does
        start_step = self.state.global_step
        epoch0, skip = divmod(start_step, steps_per_epoch)

        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dl
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        logger.info(f"LOMO training: {max_steps} steps, {num_epochs} epochs, {steps_per_epoch} steps/epoch, "
                    f"resuming at step {start_step}" if start_step else f"LOMO training: {max_steps} steps")
        tr_loss = torch.zeros((), device=args.device)
        self._loss_since_log, self._steps_since_log, self._log_time = tr_loss.clone(), 0, time.time()
        self._updates_since_log = 0
        self._ignore_keys_for_eval = ignore_keys_for_eval
        start = time.time()
        if args.eval_on_start:
            self._evaluate(None, ignore_keys_for_eval, skip_scheduler=True)
        previous = _install_sigterm(self._on_sigterm)
        try:
            for epoch in range(epoch0, num_epochs if start_step < max_steps else 0):
                if hasattr(train_dl, "set_epoch"):
                    train_dl.set_epoch(epoch)
                batches = train_dl
                if epoch == epoch0 and skip:
                    from accelerate import skip_first_batches
                    batches = skip_first_batches(train_dl, skip * gas)
                self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
                iterator = iter(batches)
                for i in itertools.count(skip if epoch == epoch0 else 0):
                    # the stock Trainer's batch fetch: all micro-batches of a step at once, and the label tokens of
                    # all of them on all ranks, which weighs every micro-step's loss
                    wanted = gas if i != steps_per_epoch - 1 else last_micro_batches
                    samples, num_items = self.get_batch_samples(iterator, wanted, args.device)
                    if not samples:
                        break
                    self.current_gradient_accumulation_steps = len(samples)
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                    skips_before = self.optimizer.skipped_steps
                    loss = None
                    for j, inputs in enumerate(samples):
                        micro = self.training_step(model, inputs, num_items, last_micro_step=j == len(samples) - 1)
                        loss = micro if loss is None else loss + micro  # the step's loss, as the stock Trainer sums
                        self.current_flos += float(self.floating_point_ops(inputs))
                    skipped = self.optimizer.last_step_skipped
                    if not skipped:  # a skipped step (fp16 overflow, non-finite loss) is not counted in the loss
                        tr_loss += loss
                        self._loss_since_log += loss
                        self._updates_since_log += 1
                    self._steps_since_log += 1
                    # skipped_steps also counts an update pass found non-finite, reported at the next step
                    self._check_divergence(self.optimizer.skipped_steps > skips_before)
                    if not skipped:  # the schedule waits for a step that updated, as in DeepSpeed
                        self.lr_scheduler.step()
                    self.state.global_step += 1
                    self.state.epoch = epoch + (i + 1) / steps_per_epoch
                    self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                    if self.optimizer.agreed_flags.get("stop"):  # any rank's SIGTERM, agreed at the step's one sync
                        self.control.should_save = self.control.should_training_stop = True
                    self._log_evaluate_save()
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
                self._log_evaluate_save()
                if self.control.should_training_stop:
                    break
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self.optimizer.agreed_flags.get("stop"):
            logger.warning(f"SIGTERM: saved {CKPT_PREFIX}{self.state.global_step}, exiting")
            raise SystemExit(128 + signal.SIGTERM)

        if dist.is_initialized():
            dist.all_reduce(tr_loss)
            tr_loss /= dist.get_world_size()
        run_steps = self.state.global_step - start_step  # in this call, as the stock Trainer reports them
        metrics = speed_metrics("train", start, num_samples=run_steps * self._global_batch(), num_steps=run_steps)
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = tr_loss.item() / max(run_steps, 1)
        self.is_in_train = False
        self.log(metrics)
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info(f"loading the best model from {self.state.best_model_checkpoint} "
                        f"({args.metric_for_best_model} = {self.state.best_metric})")
            self._load_weights(self.state.best_model_checkpoint)
            _zero.refresh_partitions(self.deepspeed)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _enable_activation_checkpointing(self) -> None:
        """What the stock Trainer.train does before its loop (transformers 5.2x renamed gradient_ to activation_)."""
        args, model = self.args, self.model
        new = hasattr(args, "activation_checkpointing")  # read only the current name: the old one warns
        if not (args.activation_checkpointing if new else args.gradient_checkpointing):
            return
        kwargs = dict((args.activation_checkpointing_kwargs if new else args.gradient_checkpointing_kwargs) or {})
        kwargs.setdefault("use_reentrant", False)  # the variant LOMO's tests cover; reentrant also works
        extra = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **extra)
        model.config.use_cache = False

    def _check_memory(self, train_dl) -> None:
        """check_memory (asked for, never by default): refuse, before the engine is built, a setting the planner
        predicts does not fit this GPU. The sequence length is the first batch's; LLaMA-shaped models only."""
        from .bench.planner import check_fits

        s, args = self.lomo_settings, self.args
        if args.device.type != "cuda":
            logger.warning("check_memory: not on a GPU, nothing checked")
            return
        mode = "lomo_accum" if s.accumulation_dtype else s.optimizer
        try:
            line = check_fits(self.model.config, mode=mode, gpus=_world(),
                              gpu_mem_bytes=torch.cuda.get_device_properties(args.device).total_memory,
                              seq_len=next(iter(train_dl))["input_ids"].shape[-1],
                              batch=args.per_device_train_batch_size,
                              dtype="fp16" if s.fp16 else "bf16" if s.bf16 else "fp32",
                              accum_dtype=s.accumulation_dtype or "fp32",
                              activation_checkpointing=bool(getattr(args, "activation_checkpointing", None)
                                                            or getattr(args, "gradient_checkpointing", False)),
                              ds_config=self._ds_config)
        except ValueError as e:
            if str(e).startswith("check_memory"):
                raise ConfigError(str(e)) from None
            logger.warning(f"check_memory: {e}; nothing checked")
            return
        logger.info(f"check_memory: {line}")

    def _check_divergence(self, skipped: bool) -> None:
        """Stop after ``max_consecutive_skips`` steps in a row that changed nothing because the loss or a gradient
        was non-finite. With fp16, overflows count only once the loss scale is at its minimum: before that,
        lowering the scale is the cure, as DeepSpeed's scaler sees it."""
        scaler = self.optimizer.loss_scaler
        if skipped and (scaler is None or scaler.scale <= scaler.min_loss_scale):
            self._consecutive_skips += 1
        elif not skipped:
            self._consecutive_skips = 0
        if self._consecutive_skips >= self.lomo_settings.max_consecutive_skips:
            if self._steps_since_log:
                self.log(self._step_metrics())
            last = last_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"training diverged: {self._consecutive_skips} steps in a row (up to step {self.state.global_step + 1})"
                " had a non-finite loss or gradient and were skipped; lower learning_rate or clip (max_grad_norm), "
                + (f"then resume from {last}" if last else "then start again"))

    def _on_sigterm(self, signum, frame):
        self.optimizer.shared_flags["stop"] = True  # installed once the optimizer exists; shared at the next step's sync

    def _log_evaluate_save(self) -> None:
        """As the stock Trainer's log/evaluate/save: the best metric is tracked, ``save_strategy="best"`` saves
        on a new best, callbacks (early stopping) see the metrics."""
        if self.control.should_log and self._steps_since_log:
            self.log(self._step_metrics())
        if self.control.should_evaluate:
            metrics = self._evaluate(None, self._ignore_keys_for_eval)
            new_best = self._determine_best_metric(metrics=metrics, trial=None)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = new_best
            self.model.train()
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _step_metrics(self) -> dict:
        """Loss, lr, grad norm, loss scale, tokens/s and peak memory since the last log (one sync)."""
        opt = self.optimizer
        values = torch.stack([self._loss_since_log.float(), (self._tokens if self._tokens is not None
                                                              else torch.zeros(())).float().to(self.args.device)])
        if dist.is_initialized():
            dist.all_reduce(values)
        world = dist.get_world_size() if dist.is_initialized() else 1
        loss_sum, tokens = values.tolist()
        elapsed = max(time.time() - self._log_time, 1e-9)
        logs = {"loss": round(loss_sum / world / max(self._updates_since_log, 1), 6),
                "learning_rate": opt.param_groups[0]["lr"],
                "tokens_per_second": round(tokens / elapsed, 1),
                "peak_memory_gb": round(_peak_memory_gb(self.args.device), 3)}
        if opt.adapters is not None:
            logs["adapter_learning_rate"] = opt.param_groups[-1]["lr"]
        if opt.grad_norm is not None:
            logs["grad_norm"] = opt.grad_norm
        if opt.loss_scale is not None:
            logs["loss_scale"] = opt.loss_scale
        logs["skipped_steps"] = opt.skipped_steps  # in every precision: a silent skip hides a divergence
        self._loss_since_log.zero_()
        self._steps_since_log, self._updates_since_log, self._tokens, self._log_time = 0, 0, None, time.time()
        return logs

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
                adapters = self.optimizer.adapters
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

    def _save_checkpoint(self, model, trial=None, metrics=None) -> None:
        final = os.path.join(self.args.output_dir, f"{CKPT_PREFIX}{self.state.global_step}")
        tmp = final + ".tmp"
        if self.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        self.save_model(tmp, _internal_call=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": checkpoint.rng_states()},
                   os.path.join(tmp, LOMO_STATE.format(_rank())))  # plain data: loads with weights_only=True
        best = os.path.join(self.args.output_dir, f"{CKPT_PREFIX}{self.state.best_global_step}")
        if self.args.metric_for_best_model and self.state.best_global_step and \
                (self.state.best_global_step == self.state.global_step or os.path.isdir(best)):
            self.state.best_model_checkpoint = best  # as the stock Trainer records it, before the state is saved
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(tmp, SCHEDULER))
            self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))
        _barrier()
        if self.args.should_save:  # the manifest goes last: only a whole folder has one
            checkpoint.write_manifest(tmp, world_size=_world(), global_batch=self._global_batch())
        if self.args.should_save:  # swap in the finished folder; the old one goes only after that
            old = final + ".old"
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            self._rotate()
        _barrier()

    def _rotate(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = checkpoint.list_checkpoints(self.args.output_dir)
        best = self.state.best_model_checkpoint
        if best in found:  # the best counts as the newest, so it is never rotated out (as in the stock Trainer)
            found.remove(best)
            found.append(best)
            limit = max(limit, 2)  # and the newest stays too, for resuming
        for path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    def _global_batch(self) -> int:
        return self.args.per_device_train_batch_size * _world() * self.lomo_settings.gradient_accumulation_steps

    def _load_checkpoint(self, folder: str) -> None:
        """Weights, TrainerState, scheduler, LOMO state and RNG from ``folder`` (a LOMOTrainer checkpoint), or
        weights, TrainerState and scheduler from a stock Trainer checkpoint. Nothing is unpickled."""
        kind = checkpoint.kind(folder)
        try:
            self.state = TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE))
        except (OSError, ValueError, TypeError) as e:
            raise checkpoint.CheckpointError(f"{os.path.join(folder, TRAINER_STATE)} is unreadable "
                                             f"({type(e).__name__}): pass an older checkpoint-N folder") from None
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self._load_weights(folder)
        _zero.refresh_partitions(self.deepspeed)
        if kind == "hf":
            self._load_stock_state(folder)
            return
        info = checkpoint.run_info(folder)
        if info and (info.get("world_size"), info.get("global_batch")) != (_world(), self._global_batch()):
            seen = self.state.global_step * info["global_batch"]
            logger.warning(f"{folder} was written by {info['world_size']} processes with a global batch of "
                           f"{info['global_batch']}; this run has {_world()} and {self._global_batch()}. The data "
                           f"position is counted in steps: resuming at step {self.state.global_step} starts at sample "
                           f"{self.state.global_step * self._global_batch()} of the epoch order, not {seen}.")
        state_file = os.path.join(folder, LOMO_STATE.format(_rank()))
        if not os.path.isfile(state_file):  # resumed on fewer/more ranks: the scaler and step are shared
            state_file = os.path.join(folder, LOMO_STATE.format(0))
        lomo_state = checkpoint.load_state(state_file)
        self.optimizer.load_state_dict(lomo_state["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint.load_state(os.path.join(folder, SCHEDULER)))
        checkpoint.set_rng_states(lomo_state["rng"])

    def _load_weights(self, folder: str) -> None:
        from safetensors import SafetensorError, safe_open

        params = dict(self.model.named_parameters())
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise checkpoint.CheckpointError(
                f"{folder} has no *.safetensors weights (a DeepSpeed-only checkpoint?): consolidate it with "
                "DeepSpeed's zero_to_fp32.py or set stage3_gather_16bit_weights_on_model_save, then resume")
        names = {n: n for n in params}  # name in the files -> parameter name
        if self.lora:  # the base weights under the plain model's names, the adapters in peft's folder
            names = {lora.file_key(self.model, n): n for n in params}
            files += sorted(glob.glob(os.path.join(folder, lora.ADAPTER_FOLDER, "*.safetensors")))
        loaded = set()
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        name = names.get(key)
                        p = params.get(name)
                        if p is None:
                            continue
                        full = f.get_tensor(key)
                        with torch.no_grad():
                            if _zero.is_zero3_param(p):
                                _zero.load_full_param_(p, full)
                            else:
                                p.copy_(full)
                        loaded.add(name)
            except (SafetensorError, OSError) as e:
                raise checkpoint.CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0][:160]}): pass an "
                                                 "older checkpoint-N folder") from None
        base = self.model.get_base_model() if self.lora else self.model
        missing = [n for n, p in params.items() if n not in loaded and
                   not _hf.is_tied(base, lora.base_key(n) if self.lora else n)]
        if missing:
            raise checkpoint.CheckpointError(f"{folder} lacks weights for {missing[:3]}: it belongs to another model")

    def _load_stock_state(self, folder: str) -> None:
        """A stock Trainer checkpoint: its AdamW state means nothing to SGD, its RNG files are pickled (not
        loaded); the schedule continues at its step."""
        path = os.path.join(folder, SCHEDULER)
        try:
            state = checkpoint.load_state(path)
        except checkpoint.CheckpointError:
            state = None
        groups = len(self.optimizer.param_groups)  # stock AdamW/SGD have two groups (decay, no decay), LOMO one
        ours = self.lr_scheduler.state_dict()
        if isinstance(state, dict) and set(state) == set(ours) and len(state.get("base_lrs", ())) == groups:
            self.lr_scheduler.load_state_dict(state)
        else:  # the same schedule, advanced to the checkpoint's step
            for _ in range(self.state.global_step):
                self.lr_scheduler.step()
        logger.warning(f"{folder} is a stock Trainer checkpoint: resuming its weights, step "
                       f"{self.state.global_step} and lr schedule; its optimizer state and RNG are not used by LOMO")


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
