"""lomo_trainer: full-parameter fine-tuning with LOMO's fused update on DeepSpeed ZeRO-3."""
import importlib

__all__ = ["LOMO", "AdaLomo", "DynamicLossScaler", "LOMOArguments", "LOMOTrainer", "disable_cpu_shm_build"]
__version__ = "0.1.0"

# Imported on first use: the planner (``python -m lomo_trainer.planner``) is arithmetic and must not pay for torch,
# and the trainer pulls in transformers.
_LAZY = {"LOMO": ".optim", "AdaLomo": ".optim", "DynamicLossScaler": ".loss_scaler", "LOMOArguments": ".config",
         "LOMOTrainer": ".trainer"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


def disable_cpu_shm_build() -> None:
    """On a CPU, before ``deepspeed.init_distributed()``: skip compiling DeepSpeed's shared-memory op (60-90 s of
    g++), which only inference uses."""
    from ._zero import disable_cpu_shm_build as disable

    disable()
