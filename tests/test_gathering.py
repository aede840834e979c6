""""auto" gathering limits: the rule, the planner's verdict that per-rank memory then falls with the GPU count,
and the filling LOMOTrainer's engine config gets."""
import json
from types import SimpleNamespace

import pytest

from lomo_trainer.gathering import KEYS, auto_gathering, fill_auto, model_numels
from lomo_trainer.bench.planner import Setup, ZeroKnobs, breakdown, load_inventory, main

AUTO = dict.fromkeys(KEYS, "auto")


def numels(name):
    return load_inventory(name).numels


def test_rule_bounds_and_monotone():
    small = numels("small")
    n, largest = sum(small), max(small)
    prev = None
    for gpus in (1, 2, 3, 4, 8, 64):
        z = auto_gathering(small, gpus, dtype_bytes=4)
        live = z["stage3_max_live_parameters"]
        assert live == z["stage3_max_reuse_distance"] == max(n // (2 * gpus), largest)
        assert z["stage3_prefetch_bucket_size"] == min(int(5e7), live)
        assert prev is None or live <= prev
        prev = live
    assert auto_gathering(numels("65b"), 8)["stage3_max_live_parameters"] == int(1e9), "never above DeepSpeed's default"
    # 7B on 8 x 24 GB: half a shard (421 M), which the memory allows
    assert auto_gathering(numels("7b"), 8, 2, 24 * 2**30)["stage3_max_live_parameters"] == load_inventory("7b").n_params // 16
    # memory-bound: 65B on 8 x 20 GB has 3.8 GiB left beside its shard and the context, a quarter for gathering
    tight = auto_gathering(numels("65b"), 8, 2, 20 * 2**30)["stage3_max_live_parameters"]
    assert tight == (20 * 2**30 - 2 * -(-load_inventory("65b").n_params // 8) - 2**30) // 8 < int(1e9)
    assert auto_gathering(numels("65b"), 8, 2, 16 * 2**30)["stage3_max_live_parameters"] == max(numels("65b"))
    # 13B on one 24 GB GPU: its 24 GiB shard leaves nothing, unless offload_param keeps it on the host
    assert auto_gathering(numels("13b"), 1, 2, 24 * 2**30)["stage3_max_live_parameters"] == max(numels("13b"))
    assert auto_gathering(numels("13b"), 1, 2, 24 * 2**30, offload_param=True)["stage3_max_live_parameters"] == int(1e9)
    with pytest.raises(ValueError):
        auto_gathering(small, 0)


def test_planner_per_rank_peak_falls_with_gpus_and_beats_one_process():
    """The issue's target, as the planner sees it: 58M, fp32, seq 256 x 2, CPU (what docs/benchmarks.md measures)."""
    shape = load_inventory("small")
    totals, default = {}, {}
    for gpus in (1, 2, 3):
        zero = ZeroKnobs.from_ds_config(auto_gathering(numels("small"), gpus, 4))
        s = dict(gpus=gpus, seq_len=256, batch=2, dtype="fp32", device="cpu")
        totals[gpus] = breakdown(shape, Setup(zero=zero, **s), "lomo")["total"]
        default[gpus] = breakdown(shape, Setup(**s), "lomo")["total"]
    assert totals[1] > totals[2] > totals[3]
    assert default[2] > default[1], "DeepSpeed's defaults: 2 ranks above one process (the issue's 753.6 vs 605.6)"
    assert totals[2] < default[1], "auto: 2 ranks below one process"


def test_fill_auto_fills_only_auto_keys():
    zero = {"stage": 3, "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": 5,
            "reduce_bucket_size": "auto"}
    out = fill_auto(zero, [10, 1000], gpus=2)
    assert out["stage3_max_live_parameters"] == 1000 and out["stage3_max_reuse_distance"] == 5
    assert out["reduce_bucket_size"] == "auto" and out["stage"] == 3 and "stage3_prefetch_bucket_size" not in out
    assert fill_auto({"stage": 3}, [10], 2) == {"stage": 3}
    # the block's own offload_param decides whether the shard counts against the device's memory
    big, mem = numels("13b"), 24 * 2**30
    on_device = fill_auto({"stage3_max_live_parameters": "auto"}, big, 1, 2, mem)
    offloaded = fill_auto({"stage3_max_live_parameters": "auto", "offload_param": {"device": "cpu"}}, big, 1, 2, mem)
    assert on_device["stage3_max_live_parameters"] < offloaded["stage3_max_live_parameters"] == int(1e9)


def test_engine_config_fills_auto_from_the_model():
    import torch

    from lomo_trainer.config import engine_config

    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.Linear(200, 10))
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, fp16=False, bf16=True)
    ds = {"zero_optimization": {"stage": 3, **AUTO}, "bf16": {"enabled": "auto"}}
    filled = engine_config(ds, args, world_size=2, model=model)["zero_optimization"]
    want = auto_gathering(model_numels(model), 2, 2)
    assert {k: filled[k] for k in KEYS} == want and want["stage3_max_live_parameters"] == 20000
    # without a model (the old behaviour): "auto" dropped, DeepSpeed's defaults apply
    assert not set(KEYS) & set(engine_config(ds, args, world_size=2)["zero_optimization"])


def test_planner_fills_auto_from_a_shipped_config(capsys):
    root = __file__.rsplit("/tests/", 1)[0]
    assert all(json.load(open(f"{root}/configs/{c}"))["zero_optimization"][k] == "auto"
               for c in ("zero3_fp16.json", "zero3_bf16.json", "zero3_bf16_adalomo.json") for k in KEYS)
    main(["--model", "7b", "--gpus", "8", "--gpu-mem-gb", "24", "--json", "--ds-config", f"{root}/configs/zero3_fp16.json"])
    gathered = json.loads(capsys.readouterr().out)["modes"]["lomo"]["gathered_working_set"]
    assert gathered == 2 * (load_inventory("7b").n_params // 16)
