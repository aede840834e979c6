"""lomo_trainer: full-parameter fine-tuning with LOMO's fused update on DeepSpeed ZeRO-3."""
from .loss_scaler import DynamicLossScaler
from .optimizer import LOMO

__all__ = ["LOMO", "DynamicLossScaler", "LOMOTrainer"]
__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in transformers: import it only when asked for
    if name == "LOMOTrainer":
        from .trainer import LOMOTrainer
        return LOMOTrainer
    raise AttributeError(name)
