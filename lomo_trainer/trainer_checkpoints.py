"""LOMOTrainer's checkpoint methods: writing ``checkpoint-N`` (no pickles, crash-safe) and resuming from one.

They are trainer methods the stock loop reaches through ``_hf.StockLoopHooks``; the file layout is checkpoint.py's."""
from __future__ import annotations

import logging
import math
import os

import torch
from transformers.trainer_callback import ExportableState

from . import _zero, checkpoint
from .checkpoint import PREFIX as CKPT_PREFIX, SCHEDULER, TRAINER_STATE, last_checkpoint
from .errors import CheckpointError, ConfigError, SaveFailed
from .ranks import raise_agreed, rank, world

logger = logging.getLogger(__name__)


def write_error(e: Exception, what: str) -> SaveFailed:
    """A failed write (a full disk: OSError, or torch's and safetensors' own wrappers of it) as one line."""
    reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    where = getattr(e, "filename", None)
    return SaveFailed(f"writing {what} failed: {reason}" + (f" ({where})" if where else ""))


class CheckpointMethods:
    """Mixed into LOMOTrainer: its checkpoint writing and loading."""

    def save_lomo_checkpoint(self) -> None:
        """``checkpoint-N``, as the stock ``_save_checkpoint`` does it but LOMO's: the model folder, each rank's LOMO
        state and RNG, the scheduler and TrainerState; written as ``.tmp``, with a manifest last, then renamed."""
        args = self.args
        self.store_flos()
        final = os.path.join(args.output_dir, f"{CKPT_PREFIX}{self.state.global_step}")
        previous = last_checkpoint(args.output_dir)
        try:
            self._write_checkpoint(final)
        except SaveFailed as e:  # every rank (agreed): nothing unfinished stays, the earlier checkpoints do
            if args.should_save:
                checkpoint.abandon_save(final + ".tmp")
            raise SaveFailed(f"{e}; removed the unfinished {os.path.basename(final)}.tmp, "
                             + (f"{previous} is kept" if previous else "no earlier checkpoint exists")
                             + ": free space, then resume") from None

    def _write_checkpoint(self, final: str) -> None:
        args, error, tmp = self.args, None, final + ".tmp"
        try:
            tmp = checkpoint.begin_save(final, args.should_save)
        except OSError as e:
            error = write_error(e, tmp)
        raise_agreed(error)
        self.save_model(tmp, _internal_call=True)
        try:
            checkpoint.save_rank_state(tmp, rank(), self.lomo_optimizer.state_dict())
        except Exception as e:  # noqa: BLE001
            error = write_error(e, f"this rank's state to {tmp}")
        best = os.path.join(args.output_dir, f"{CKPT_PREFIX}{self.state.best_global_step}")
        if args.metric_for_best_model and self.state.best_global_step and \
                (self.state.best_global_step == self.state.global_step or os.path.isdir(best)):
            self.state.best_model_checkpoint = best  # as the stock Trainer records it, before the state is saved
        if args.should_save and error is None:
            for cb in self.callback_handler.callbacks + [self.control]:  # as stock: early stopping's patience etc.
                if isinstance(cb, ExportableState):
                    name, saved = type(cb).__name__, self.state.stateful_callbacks
                    if isinstance(saved.get(name), list):
                        saved[name].append(cb.state())
                    else:
                        saved[name] = cb.state()
            try:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(tmp, SCHEDULER))
                self.state.save_to_json(os.path.join(tmp, TRAINER_STATE))
            except Exception as e:  # noqa: BLE001
                error = write_error(e, tmp)
        raise_agreed(error)
        if args.should_save:
            try:
                checkpoint.finish_save(tmp, final, world_size=world(), global_batch=self._global_batch(),
                                       learning_rate=self.lomo_settings.lr, lr_scheduler_type=self._schedule_name())
                checkpoint.rotate(args.output_dir, args.save_total_limit, self.state.best_model_checkpoint)
            except Exception as e:  # noqa: BLE001
                error = write_error(e, final)
        raise_agreed(error)

    def _schedule_name(self) -> str:
        s = self.lomo_settings.scheduler
        return s["type"] if s else getattr(self.args.lr_scheduler_type, "value", str(self.args.lr_scheduler_type))

    def _global_batch(self) -> int:
        return self.args.per_device_train_batch_size * world() * self.lomo_settings.gradient_accumulation_steps

    # ------------------------------------------------------------------ loading
    def load_lomo_checkpoint(self, folder: str) -> None:
        """Weights, scheduler and LOMO state from ``folder`` (a LOMOTrainer checkpoint), or weights and schedule
        from a stock Trainer checkpoint; the stock loop has read its TrainerState. Nothing is unpickled. A file
        that one rank cannot load stops every rank with the same line."""
        error = None
        try:
            self._load_checkpoint_files(folder)
        except (ConfigError, OSError) as e:
            error = e if isinstance(e, ConfigError) else CheckpointError(f"{folder}: {e}")
        raise_agreed(error)
        _zero.refresh_partitions(self.deepspeed)

    def _load_checkpoint_files(self, folder: str) -> None:
        """This rank's part of ``load_lomo_checkpoint``: file reads only, no collective."""
        checkpoint.load_weights(self.model, folder, self.lora)
        if checkpoint.kind(folder) == "hf":  # its AdamW state means nothing to SGD
            checkpoint.load_stock_scheduler(folder, self.lr_scheduler, len(self.lomo_optimizer.param_groups),
                                            self.state.global_step)
            logger.warning(f"{folder} is a stock Trainer checkpoint: resuming its weights, step "
                           f"{self.state.global_step} and lr schedule; its optimizer state and RNG are not used by LOMO")
            return
        info = checkpoint.run_info(folder)
        if info and (info.get("world_size"), info.get("global_batch")) != (world(), self._global_batch()):
            seen = self.state.global_step * info["global_batch"]
            logger.warning(f"{folder} was written by {info['world_size']} processes with a global batch of "
                           f"{info['global_batch']}; this run has {world()} and {self._global_batch()}. The data "
                           f"position is counted in steps: resuming at step {self.state.global_step} starts at sample "
                           f"{self.state.global_step * self._global_batch()} of the epoch order, not {seen}.")
        self.lomo_optimizer.load_state_dict(checkpoint.load_rank_state(folder, rank())["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint.load_state(os.path.join(folder, SCHEDULER)))
        self._warn_changed_schedule(folder, info)

    def _warn_changed_schedule(self, folder: str, info: dict) -> None:
        """Resuming restores the checkpoint's scheduler state, and with it the learning rate it was trained with
        (as the stock Trainer does, silently): a different learning_rate or schedule given now is named."""
        if rank() != 0:
            return
        theirs, ours = info.get("learning_rate"), self.lomo_settings.lr
        if theirs is not None and not math.isclose(theirs, ours, rel_tol=1e-9, abs_tol=0.0):
            logger.warning(f"{folder} was trained with learning_rate {theirs}; this run gives {ours}. Resuming keeps "
                           f"the checkpoint's schedule state, so the lr still follows learning_rate {theirs} and {ours} "
                           f"is not used; to train at {ours}, start a new run from the checkpoint's weights "
                           f"(model_name_or_path={folder}) instead of resuming")
        schedule = info.get("lr_scheduler_type")
        if schedule is not None and schedule != self._schedule_name():
            logger.warning(f"{folder} was trained with the {schedule} schedule; this run gives {self._schedule_name()}: "
                           f"resuming continues at step {self.state.global_step} on this run's {self._schedule_name()} "
                           f"curve, from the checkpoint's learning_rate {theirs if theirs is not None else ''}".rstrip())

    def load_rng_state(self, folder: str | None) -> None:
        """This rank's RNG states, where the stock loop restores them (the stock files are pickled: not read)."""
        if folder is not None and checkpoint.kind(folder) != "hf":
            checkpoint.set_rng_states(checkpoint.load_rank_state(folder, rank())["rng"])

    def load_best_weights(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info(f"loading the best model from {best} ({self.args.metric_for_best_model} = {self.state.best_metric})")
        checkpoint.load_weights(self.model, best, self.lora)
        _zero.refresh_partitions(self.deepspeed)
