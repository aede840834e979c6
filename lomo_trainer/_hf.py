"""Every use of transformers'/accelerate's private attributes lives here, so an upgrade touches one file.

Checked against transformers 5.25 (trainer.py line numbers below) and accelerate 1.16:
- ``TrainingArguments.hf_deepspeed_config.config`` is the dict accelerate hands to ``deepspeed.initialize``; with
  ``accelerate launch`` and DeepSpeed set only in accelerate's YAML, ``TrainingArguments.deepspeed`` stays unset and
  the dict is ``TrainingArguments.deepspeed_plugin.hf_ds_config.config`` (the plugin TrainingArguments builds from
  accelerate's ``ACCELERATE_*`` variables; the Trainer copies it into the accelerator's plugin);
- TRL's trainers keep their per-step metrics in ``_metrics`` and a token count in ``_total_train_tokens``, both
  appended to by ``compute_loss``;
- ``Accelerator._models`` is where ``evaluate()`` looks for an already-built DeepSpeed engine, and
  ``Accelerator._optimizers`` is what ``Accelerator.optimizer_step_was_skipped`` asks (the stock loop steps the lr
  scheduler only when it is false);
- ``model._is_accelerate_prepared`` makes ``accelerate.prepare`` leave a module as it is;
- ``Trainer._prepare_inputs``, ``_tr_loss`` and ``_globalstep_last_logged`` (the stock loop's inputs and pending loss);
- the five private ``Trainer`` methods ``StockLoopHooks`` replaces, each for a reason given there;
- ``PreTrainedModel._tied_weights_keys`` names the parameters saved under another name (a dict in 5.x);
- ``HfArgumentParser._actions`` (argparse's) lists the flags, one per dataclass field;
- ``AcceleratorState._reset_state`` / ``GradientState._reset_state`` clear accelerate's per-process singletons;
- ``TrainingArguments._setup_devices`` (a cached property that ``__post_init__`` reaches through ``self.device``)
  builds accelerate's ``PartialState``, which under a launcher initialises torch.distributed.
"""
from __future__ import annotations

import re


def deepspeed_config_source(args) -> tuple[dict | None, str | None]:
    """(the DeepSpeed config as the user wrote it, where it came from), or (None, None) without DeepSpeed:
    ``TrainingArguments.deepspeed`` (a path or a dict), else accelerate's DeepSpeed plugin (``accelerate launch``
    with ``distributed_type: DEEPSPEED`` and ``deepspeed_config_file`` or ``zero_stage``/... in its YAML). The
    plugin's copy has accelerate's own additions (``steps_per_print``, the YAML's keys); its "auto" values are
    still "auto" and are filled from TrainingArguments as for a JSON. A copy: the caller replaces the original."""
    import copy

    from .config import load_json

    if args.deepspeed:
        where = args.deepspeed if isinstance(args.deepspeed, str) else "TrainingArguments.deepspeed"
        return load_json(args.deepspeed), where
    plugin = getattr(args, "deepspeed_plugin", None)
    hf_ds = getattr(plugin, "hf_ds_config", None)
    if hf_ds is None or not isinstance(getattr(hf_ds, "config", None), dict):
        return None, None
    return copy.deepcopy(hf_ds.config), "accelerate's DeepSpeed plugin (accelerate config YAML)"


def set_deepspeed_config(args, config: dict) -> None:
    """accelerate must never build a DeepSpeed optimizer or scheduler for LOMO: the config it passes to
    ``deepspeed.initialize`` becomes ``config`` (LOMOTrainer's: no optimizer, scheduler or lora block, its own
    "auto" values). The dict is replaced in place: accelerate's DeepSpeed plugin holds the same object.

    A config from accelerate's YAML is first set up as TrainingArguments sets up ``--deepspeed``
    (``HfTrainerDeepSpeedConfig`` with the TrainingArguments values filled in, held by ``args`` and the plugin):
    otherwise the Trainer fills it from the arguments only when it builds the accelerator
    (``propagate_args_to_deepspeed``), after the replacement, and takes LOMO's own values (``gradient_clipping``
    0: LOMO clips) for disagreements with TrainingArguments."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if getattr(args, "hf_deepspeed_config", None) is None and plugin is not None:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        hf_ds = HfTrainerDeepSpeedConfig(plugin.hf_ds_config.config)  # a copy, "auto" values as written
        hf_ds.trainer_config_process(args)
        args.hf_deepspeed_config = plugin.hf_ds_config = hf_ds
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is not None:
        hf_ds.config.clear()
        hf_ds.config.update(config)
        if plugin is not None:
            plugin.deepspeed_config = hf_ds.config


def metric_state(trainer):
    """TRL's per-step metrics and token count (None for a trainer without them), to be put back after a repeated
    forward: LOMO runs ``compute_loss`` twice in a step when it clips by the global norm or scales an fp16 loss,
    and the stock loop runs it once."""
    import copy

    return copy.deepcopy(getattr(trainer, "_metrics", None)), getattr(trainer, "_total_train_tokens", None)


def restore_metric_state(trainer, state) -> None:
    metrics, tokens = state
    if metrics is not None:
        trainer._metrics = metrics
    if tokens is not None:
        trainer._total_train_tokens = tokens


def deepspeed_engine(trainer):
    """The DeepSpeed engine ``accelerator.prepare`` built in this ``train()``, or the one a previous call built."""
    wrapped = trainer.accelerator.deepspeed_engine_wrapped
    return wrapped.engine if wrapped is not None else trainer.model_wrapped


def register_engine(accelerator, engine) -> None:
    """``evaluate()`` builds its own DeepSpeed engine when accelerate knows no model: show it ours."""
    if engine not in accelerator._models:
        accelerator._models.append(engine)


def report_skipped_steps(accelerator, optimizer) -> None:
    """The stock loop leaves the lr schedule alone after a step ``accelerator.optimizer_step_was_skipped`` reports
    (trainer.py:1986); accelerate asks each optimizer it knows for ``step_was_skipped``."""
    if optimizer not in accelerator._optimizers:
        accelerator._optimizers.append(optimizer)


def keep_unwrapped(model) -> None:
    """``accelerator.prepare`` would wrap a plain module in DistributedDataParallel (a full-size gradient bucket
    and its own all-reduce, which LOMO does inside backward) and in autocast (LOMO trains in the weights' dtype)."""
    model._is_accelerate_prepared = True


def prepare_inputs(trainer, inputs: dict) -> dict:
    """The stock ``training_step``'s input preparation: to the device, floats in DeepSpeed's dtype."""
    return trainer._prepare_inputs(inputs)


def pending_train_loss(trainer) -> float:
    """The mean training loss the stock loop would log next (over ranks and the steps since its last log, this
    one included): for a log written before the loop gets there."""
    from transformers.trainer_pt_utils import nested_gather

    steps = max(trainer.state.global_step + 1 - trainer._globalstep_last_logged, 1)
    return nested_gather(trainer._tr_loss, trainer.args.parallel_mode).mean().item() / steps


class StockLoopHooks:
    """The stock ``Trainer``'s private checkpoint methods, replaced: LOMO's checkpoints hold no pickled DeepSpeed
    engine state or RNG file and load with ``weights_only=True`` (see checkpoint.py). Each hook calls a public method
    of the trainer. Everything else in ``Trainer.train`` runs as it is."""

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Stock, with a checkpoint: deepspeed_load_checkpoint (trainer.py:1848, a pickled engine checkpoint; raises
        # without a global_step* folder), _load_optimizer_and_scheduler and _load_scaler. LOMO loads its own, once
        # the engine and the optimizer exist.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if resume_from_checkpoint is not None:
            self.load_lomo_checkpoint(resume_from_checkpoint)
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        pass  # the stock Trainer loads plain-module weights before the loop (trainer.py:1579); LOMO does it above

    def _load_rng_state(self, checkpoint):
        self.load_rng_state(checkpoint)  # the stock RNG files are pickled

    def _save_checkpoint(self, model, trial=None):
        self.save_lomo_checkpoint()  # stock: a DeepSpeed engine checkpoint (trainer.py:3605) and pickled RNG files

    def _load_best_model(self):
        self.load_best_weights()  # stock under DeepSpeed: deepspeed_load_checkpoint (trainer.py:3797)


def is_tied(model, name: str) -> bool:
    """A parameter saved under another name (tied input/output embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return any(re.fullmatch(pattern, name) or pattern == name for pattern in names)


def parser_keys(parser) -> set[str]:
    """Every field name an HfArgumentParser accepts."""
    return {action.dest for action in parser._actions}


def set_file_values(parser, values: dict) -> None:
    """Values from a run config become the parser's defaults; one given there satisfies a required flag."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def reset_accelerate_state() -> None:
    """accelerate keeps one DeepSpeed plugin per process in a singleton; a fresh engine needs it cleared (the
    process group stays)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def arguments_for_checks(cls, **kwargs):
    """``cls(**kwargs)`` (TrainingArguments or a subclass) for its own checks and normalised values, without setting
    up devices: building it normally initialises torch.distributed under a launcher, before one input is checked.
    The device-dependent checks (bf16 support) still run, on this rank's GPU as accelerate would choose it."""
    from functools import cached_property

    class ForChecks(cls):
        @cached_property
        def _setup_devices(self):
            import os

            import torch

            self.distributed_state, self._n_gpu = None, 0
            if not self.use_cpu and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # what PartialState does first; no context yet
            return torch.device("cpu")

    ForChecks.__name__ = ForChecks.__qualname__ = cls.__name__  # its messages name the user's class
    return ForChecks(**kwargs)
