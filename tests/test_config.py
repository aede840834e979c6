"""DeepSpeed JSON / run config validation: shipped configs load, bad input fails with a message naming the key."""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from lomo_trainer.cli import main, parse
from lomo_trainer.config import ConfigError, engine_config, load_json, validate
from lomo_trainer.schedulers import deepspeed_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def targs(**kw):
    base = dict(learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, fp16=False,
                bf16=False, seed=0, per_device_train_batch_size=2, warmup_steps=0)
    base.update(kw)
    ns = SimpleNamespace(**base)
    ns.get_warmup_steps = lambda n: int(ns.warmup_steps * n) if ns.warmup_steps < 1 else int(ns.warmup_steps)
    return ns


ZERO3 = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO", "params": {"lr": "auto"}}}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))))
def test_shipped_deepspeed_configs_validate(path):
    cfg = load_json(path)
    if "model_name_or_path" in cfg:
        pytest.skip("a run config")
    fp16 = cfg.get("fp16", {}).get("enabled") is not None
    bf16 = cfg.get("bf16", {}).get("enabled") is not None
    settings = validate(cfg, targs(fp16=fp16, bf16=bf16))
    assert settings.zero_stage == 3
    engine = engine_config(cfg, targs(fp16=fp16, bf16=bf16), world_size=8)
    assert "optimizer" not in engine and "scheduler" not in engine and engine["train_batch_size"] == 16
    assert "auto" not in json.dumps(engine)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True)))
def test_shipped_run_configs_parse(path):
    if "model_name_or_path" not in load_json(path):
        pytest.skip("a DeepSpeed config")
    run, kwargs = parse([path])
    assert run.model_name_or_path
    if kwargs.get("deepspeed"):
        assert os.path.isfile(kwargs["deepspeed"]), kwargs["deepspeed"]
        ds = load_json(kwargs["deepspeed"])
        validate(ds, targs(**{k: kwargs[k] for k in ("learning_rate", "weight_decay", "max_grad_norm", "fp16", "bf16",
                                                     "per_device_train_batch_size")}))


BAD = [
    ({**ZERO3, "optimizer": {"type": "AdamW"}}, {}, "optimizer.type 'AdamW'"),
    ({**ZERO3, "gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps=4"),
    (ZERO3, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
    ({**ZERO3, "zero_optimization": {"stage": 2}}, {}, "zero_optimization.stage=2"),
    ({**ZERO3, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, {"fp16": True, "bf16": True}, "fp16 and bf16"),
    ({**ZERO3, "fp16": {"enabled": True}}, {}, r"fp16.enabled=True .* TrainingArguments.fp16=False"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"lr": 0.1}}}, {}, r"optimizer.params.lr=0.1 .*learning_rate"),
    ({**ZERO3, "gradient_clipping": 1.0, "optimizer": {"type": "LOMO", "params": {"clip_grad_norm": 0.5}}}, {},
     "gradient_clipping=1.0 but optimizer.params.clip_grad_norm=0.5"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"momentum": 0.9}}}, {}, r"unknown key\(s\) \['momentum'\]"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"clip_mode": "local"}}}, {}, "optimizer.params.clip_mode"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"stochastic_rounding": True}}}, {}, "needs bf16"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"clip_grad_value": -1}}}, {}, "clip_grad_value must be"),
    ({**ZERO3, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, {}, "offload_param.device"),
    ({**ZERO3, "scheduler": {"type": "OneCycle"}}, {}, "scheduler.type 'OneCycle'"),
    ({**ZERO3, "fp16": {"enabled": True, "loss_scale_windw": 10}}, {"fp16": True}, r"fp16 has unknown key"),
    ([1, 2], {}, "must be a JSON object"),
]


@pytest.mark.parametrize("cfg,overrides,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_deepspeed_config_is_one_clear_line(cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, targs(**overrides))
    assert "\n" not in str(info.value)


def test_engine_config_checks_batch_keys():
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 .*per_device_train_batch_size=2"):
        engine_config({**ZERO3, "train_micro_batch_size_per_gpu": 4}, targs(), world_size=2)
    with pytest.raises(ConfigError, match="train_batch_size=8"):
        engine_config({**ZERO3, "train_batch_size": 8}, targs(), world_size=2)


def test_malformed_json_names_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3},\n "optimizer": }')
    with pytest.raises(ConfigError, match="line 2"):
        load_json(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_json(tmp_path / "missing.json")


def test_cli_rejects_bad_run_config_before_any_work(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model_name_or_path": "x", "learning_rat": 0.1}))
    assert main([str(run)]) == 2
    assert "unknown key(s) ['learning_rat']" in capsys.readouterr().err
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**ZERO3, "zero_optimization": {"stage": 1}}))
    run.write_text(json.dumps({"model_name_or_path": "x", "deepspeed": str(ds), "output_dir": str(tmp_path / "o")}))
    assert main([str(run)]) == 2
    assert "zero_optimization.stage=1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing may be written for a rejected config"
    assert main([str(run), "--no_such_flag", "1"]) == 2
    assert main([str(tmp_path / "nope.json")]) == 2


def test_cli_override_takes_precedence(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model_name_or_path": "m", "learning_rate": 0.1, "output_dir": "o"}))
    r, kwargs = parse([str(run), "--learning_rate", "0.25", "--max_length", "64"])
    assert kwargs["learning_rate"] == 0.25 and r.max_length == 64


@pytest.mark.parametrize("block", [
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1, "warmup_num_steps": 7}},
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1, "warmup_num_steps": 5,
                                    "warmup_type": "linear"}},
    {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 0.1, "warmup_num_steps": 4, "total_num_steps": 20,
                                         "warmup_type": "linear"}},
    {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 4, "total_num_steps": 20, "warmup_type": "linear"}},
])
def test_schedulers_match_deepspeed(block):
    """Our LambdaLR versions against DeepSpeed's own scheduler classes on a plain torch optimizer."""
    from deepspeed.runtime import lr_schedules

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: deepspeed_scheduler(block, opt, 20, targs()))
    theirs = lrs(lambda opt: getattr(lr_schedules, block["type"])(opt, **block["params"]))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
