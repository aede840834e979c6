"""lomo_trainer: full-parameter fine-tuning with LOMO's fused update on DeepSpeed ZeRO-3."""
from .adalomo import AdaLomo
from .config import LOMOArguments
from .loss_scaler import DynamicLossScaler
from .optimizer import LOMO

__all__ = ["LOMO", "AdaLomo", "DynamicLossScaler", "LOMOArguments", "LOMOTrainer", "disable_cpu_shm_build"]
__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in transformers: import it only when asked for
    if name == "LOMOTrainer":
        from .trainer import LOMOTrainer
        return LOMOTrainer
    raise AttributeError(name)


def disable_cpu_shm_build() -> None:
    """On a CPU, before ``deepspeed.init_distributed()``: skip compiling DeepSpeed's shared-memory op (60-90 s of
    g++), which only inference uses."""
    from ._zero import disable_cpu_shm_build as disable

    disable()
