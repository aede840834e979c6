"""Every use of transformers'/accelerate's private attributes lives here, so an upgrade touches one file.

Checked against transformers 5.17 and 5.23, accelerate 1.15:
- ``TrainingArguments.hf_deepspeed_config.config`` is the dict accelerate hands to ``deepspeed.initialize``;
- ``Accelerator._models`` is where ``evaluate()`` looks for an already-built DeepSpeed engine;
- ``PreTrainedModel._tied_weights_keys`` names the parameters saved under another name (a dict in 5.x);
- ``HfArgumentParser._actions`` (argparse's) lists the flags, one per dataclass field;
- ``AcceleratorState._reset_state`` / ``GradientState._reset_state`` clear accelerate's per-process singletons.
"""
from __future__ import annotations

import re


def strip_deepspeed_optimizer(args) -> None:
    """accelerate must never build a DeepSpeed optimizer or scheduler for LOMO: drop both blocks (and LOMO+LoRA's
    lora block) from the config it will pass to DeepSpeed (LOMOTrainer reads them from its own copy)."""
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    if hf_ds is not None:
        for key in ("optimizer", "scheduler", "lora"):
            hf_ds.config.pop(key, None)


def register_engine(accelerator, engine) -> None:
    """``evaluate()`` builds its own DeepSpeed engine when accelerate knows no model: show it ours."""
    accelerator._models.append(engine)


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
