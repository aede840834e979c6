"""Dynamic loss scaling for fp16, configured like DeepSpeed's ``fp16`` block.

The scaler only keeps the number; the LOMO optimizer multiplies the loss by ``scale`` before
backward, divides it out of each gradient, and reports per step whether the gradients overflowed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DynamicLossScaler:
    """Halve the scale on overflow (after ``hysteresis`` overflows in a row), never below
    ``min_loss_scale``; double it every ``loss_scale_window`` clean steps, counted as DeepSpeed's
    ``DynamicLossScaler`` counts them: the first doubling after the start or an overflow comes on the
    ``window + 1``-th clean step (its stable interval starts at the step after the overflow), later ones
    every ``window`` steps. Tested step by step against DeepSpeed's class.

    Field names follow DeepSpeed's ``fp16`` JSON block. ``loss_scale > 0`` means a static scale.
    """

    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    loss_scale: float = 0.0  # DeepSpeed's convention: 0 = dynamic, > 0 = this static scale
    consecutive_hysteresis: bool = False

    def __post_init__(self):
        if self.loss_scale_window < 1:
            raise ValueError(f"fp16.loss_scale_window must be >= 1, got {self.loss_scale_window}")
        if self.hysteresis < 1:
            raise ValueError(f"fp16.hysteresis must be >= 1, got {self.hysteresis}")
        if self.min_loss_scale <= 0:
            raise ValueError(f"fp16.min_loss_scale must be > 0, got {self.min_loss_scale}")
        self.scale = float(self.loss_scale) if self.loss_scale > 0 else 2.0 ** self.initial_scale_power
        self.clean_steps = 0  # clean steps since the start or the last overflow
        self.hysteresis_left = self.hysteresis
        self.overflows = 0

    @property
    def dynamic(self) -> bool:
        return self.loss_scale <= 0

    @classmethod
    def from_ds_config(cls, fp16: dict) -> "DynamicLossScaler":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in fp16.items() if k in known})

    def update(self, overflow: bool) -> None:
        """Record the outcome of one step (call once per step, after the overflow check)."""
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            if not self.dynamic:
                return
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:
                self.scale = max(self.scale / 2.0, self.min_loss_scale)
            return
        if self.consecutive_hysteresis:
            self.hysteresis_left = self.hysteresis
        # DeepSpeed: stable_interval = clean steps before this one since the overflow; grow when it is a
        # positive multiple of the window
        if self.dynamic and self.clean_steps and self.clean_steps % self.loss_scale_window == 0:
            self.scale *= 2.0
            self.hysteresis_left = self.hysteresis
        self.clean_steps += 1

    def state_dict(self) -> dict:
        return {"config": asdict(self), "scale": self.scale, "clean_steps": self.clean_steps,
                "hysteresis_left": self.hysteresis_left, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.overflows = int(state.get("overflows", 0))
