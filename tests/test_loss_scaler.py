"""The fp16 loss scaler against DeepSpeed's own DynamicLossScaler, step by step."""
import random
import types

import pytest
from deepspeed.runtime.fp16 import loss_scaler as ds_loss_scaler

from lomo_trainer import DynamicLossScaler


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_scale_follows_deepspeed_over_random_overflows(monkeypatch, hysteresis, consecutive, window):
    monkeypatch.setattr(ds_loss_scaler, "dist", types.SimpleNamespace(get_rank=lambda: 1))  # no process group
    rng = random.Random(hysteresis * 100 + window * 10 + consecutive)
    for trial in range(20):
        p_overflow = rng.choice([0.05, 0.2, 0.5])
        ours = DynamicLossScaler(initial_scale_power=12, loss_scale_window=window, hysteresis=hysteresis,
                                 min_loss_scale=4.0, consecutive_hysteresis=consecutive)
        theirs = ds_loss_scaler.DynamicLossScaler(init_scale=2.0 ** 12, scale_window=window, min_scale=4.0,
                                                  delayed_shift=hysteresis, consecutive_hysteresis=consecutive,
                                                  raise_error_at_min_scale=False)
        history = []
        for _ in range(60):
            overflow = rng.random() < p_overflow
            ours.update(overflow), theirs.update_scale(overflow)
            history.append((overflow, theirs.cur_scale))
            assert ours.scale == theirs.cur_scale, history


def test_first_growth_comes_after_window_plus_one_clean_steps():
    s = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3)
    scales = []
    for _ in range(4):
        s.update(False)
        scales.append(s.scale)
    assert scales == [16, 16, 16, 32]  # DeepSpeed's sequence (issue 10), not [16, 16, 32, 32]
