"""DeepSpeed JSON / run config validation: shipped configs load, bad input fails with a message naming the key."""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from distributed import run_ranks

from lomo_trainer.cli import main, parse
from lomo_trainer.errors import ConfigError
from lomo_trainer.config import LOMOArguments, engine_config, load_json, validate
from lomo_trainer.optim.factory import build_optimizer, optimizer_kwargs
from lomo_trainer.schedulers import deepspeed_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def targs(**kw):
    base = dict(learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, fp16=False,
                bf16=False, seed=0, per_device_train_batch_size=2, warmup_steps=0, lr_scheduler_type="linear",
                lr_scheduler_kwargs=None)
    base.update(kw)
    ns = SimpleNamespace(**base)
    ns.get_warmup_steps = lambda n: int(ns.warmup_steps * n) if ns.warmup_steps < 1 else int(ns.warmup_steps)
    return ns


ZERO3 = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO", "params": {"lr": "auto"}}}


def fp16_support(monkeypatch, supported):
    """DeepSpeed's own gate (engine._do_sanity_check), patched: CPUs here differ in AVX512-FP16."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: supported)


@pytest.fixture(autouse=True)
def fp16_device(monkeypatch):
    fp16_support(monkeypatch, True)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))))
def test_shipped_deepspeed_configs_validate(path):
    cfg = load_json(path)
    if "model_name_or_path" in cfg:
        pytest.skip("a run config")
    fp16 = cfg.get("fp16", {}).get("enabled") is not None
    bf16 = cfg.get("bf16", {}).get("enabled") is not None
    settings = validate(cfg, targs(fp16=fp16, bf16=bf16))
    assert settings.lr > 0 and cfg["zero_optimization"]["stage"] == 3
    engine = engine_config(cfg, targs(fp16=fp16, bf16=bf16), world_size=8)
    assert "optimizer" not in engine and "scheduler" not in engine and engine["train_batch_size"] == 16
    assert "auto" not in json.dumps(engine)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True)))
def test_shipped_run_configs_parse(path, monkeypatch):
    if "model_name_or_path" not in load_json(path):
        pytest.skip("a DeepSpeed config")
    from transformers import TrainingArguments, training_args

    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)  # bf16 run configs, on a CPU

    run, kwargs, lomo = parse([path])
    assert run.model_name_or_path
    if kwargs.get("deepspeed"):
        assert os.path.isfile(kwargs["deepspeed"]), kwargs["deepspeed"]
        ds = load_json(kwargs["deepspeed"])
        validate(ds, TrainingArguments(**{**kwargs, "deepspeed": None}), lomo)
        if "scheduler" in ds:  # one home for the schedule: the run config leaves lr_scheduler_type out
            assert "lr_scheduler_type" not in load_json(path), path


BAD = [
    ({**ZERO3, "optimizer": {"type": "AdamW"}}, {}, "optimizer.type 'AdamW'"),
    ({**ZERO3, "gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps=4"),
    ({**ZERO3, "gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2},
     "gradient_accumulation_steps=4 in the DeepSpeed config but TrainingArguments.gradient_accumulation_steps=2"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"accumulation_dtype": "fp16"}}},
     {"gradient_accumulation_steps": 2, "bf16": True}, r"accumulation_dtype='fp16' but the weights train in bf16"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"accumulation_dtype": "fp32", "clip_mode": "global"}}}, {},
     r"accumulation_dtype='fp32' but gradient_accumulation_steps=1 and clip_mode is not \"buffered\""),
    # "auto" keeps a buffer possible only where a norm pass exists to save: not without norm clipping and fp16
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"accumulation_dtype": "fp32"}}}, {"max_grad_norm": 0.0},
     r"accumulation_dtype='fp32' but .*nor \"auto\" with norm clipping or fp16\): there is no gradient buffer"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"accumulation_dtype": "int8"}}}, {},
     "optimizer.params.accumulation_dtype='int8'"),
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
    # wrong types and shapes: one line naming the key, never a TypeError/AttributeError inside the validator
    ({**ZERO3, "gradient_accumulation_steps": "4"}, {}, "gradient_accumulation_steps must be an integer >= 1 or "
                                                          "\"auto\", got '4'"),
    ({**ZERO3, "zero_optimization": None}, {}, r"zero_optimization must be a JSON object like \{\"stage\": 3\}, got "
                                                "null: fix it or remove the key"),
    ({**ZERO3, "fp16": True}, {"fp16": True}, r"fp16 must be a JSON object like \{\"enabled\": \"auto\"\}, got true"),
    ({**ZERO3, "bf16": [True]}, {}, r"bf16 must be a JSON object like .*, got \[true\]"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": [0.1]}}, {}, r"optimizer.params must be a JSON object"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"seed": "x"}}}, {}, "optimizer.params.seed must be an integer"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"stochastic_rounding": "yes"}}}, {"bf16": True},
     "optimizer.params.stochastic_rounding must be true or false"),
    ({**ZERO3, "fp16": {"enabled": "yes"}}, {"fp16": True}, 'fp16.enabled must be true, false or "auto", got "yes"'),
    ({**ZERO3, "fp16": {"loss_scale_window": 0}}, {"fp16": True}, "fp16.loss_scale_window must be >= 1, got 0"),
    ({**ZERO3, "fp16": {"hysteresis": "2"}}, {"fp16": True}, "fp16.hysteresis must be a number, got '2'"),
    ({**ZERO3, "train_micro_batch_size_per_gpu": 2.5}, {}, "train_micro_batch_size_per_gpu must be an integer"),
    ({**ZERO3, "train_micro_batch_size_per_gpu": 4}, {}, "train_micro_batch_size_per_gpu=4 but TrainingArguments"
                                                         ".per_device_train_batch_size=2"),
    (ZERO3, {"per_device_train_batch_size": 2.5}, "per_device_train_batch_size must be an integer >= 1, got 2.5"),
    (ZERO3, {"learning_rate": -1}, "learning_rate must be >= 0, got -1"),
    ({**ZERO3, "gradient_clipping": "big"}, {}, "gradient_clipping must be a number, got 'big'"),
    ({**ZERO3, "zero_optimization": {"stage": 3, "offload_param": "cpu"}}, {}, "zero_optimization.offload_param "
                                                                               "must be a JSON object"),
    ({**ZERO3, "zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}}, {}, "offload_param.device="),
    # scheduler params at start-up, not once the engine exists
    ({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "lots"}}}, {},
     "scheduler.params.warmup_num_steps must be an integer >= 0 or \"auto\", got 'lots'"),
    ({**ZERO3, "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "low"}}}, {},
     "scheduler.params.warmup_min_lr must be a number, got 'low'"),
    ({**ZERO3, "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_max_lr": 0.1}}}, {},
     r"scheduler.params has unknown key\(s\) \['warmup_max_lr'\] for WarmupCosineLR"),
    ({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}}, {},
     "scheduler.params.warmup_type='cubic': use \"log\" or \"linear\""),
    ({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.5}}}, {},
     "scheduler.params.warmup_max_lr=0.5 but the optimizer lr is 0.001"),
    ({**ZERO3, "scheduler": {"type": "WarmupLR", "params": ["x"]}}, {}, "scheduler.params must be a JSON object"),
    ({**ZERO3, "scheduler": "WarmupLR"}, {}, "scheduler must be a JSON object"),
    # one home for each setting: a second place may restate a value, never contradict it
    ({**ZERO3, "scheduler": {"type": "WarmupDecayLR"}}, {"lr_scheduler_type": "cosine"},
     "scheduler.type=WarmupDecayLR in the DeepSpeed config but TrainingArguments.lr_scheduler_type=cosine: the "
     "schedule has one home"),
    ({**ZERO3, "scheduler": {"type": "WarmupLR"}}, {"lr_scheduler_kwargs": {"num_cycles": 2}},
     "TrainingArguments.lr_scheduler_type=linear with lr_scheduler_kwargs: the schedule has one home"),
    ({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}}, {"warmup_steps": 0.1},
     r"scheduler.params.warmup_num_steps=100 in the DeepSpeed config but TrainingArguments.warmup_steps=0.1: keep "
     r"one \(warmup_num_steps \"auto\" takes warmup_steps\)"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"weight_decay": 0.1}}}, {},
     r"optimizer.params.weight_decay=0.1 but TrainingArguments.weight_decay=0.0: set one to match or use \"auto\""),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"seed": 3}}}, {}, "optimizer.params.seed=3 but "
                                                                          "TrainingArguments.seed=0"),
    ({**ZERO3, "gradient_clipping": 0.5}, {}, "gradient_clipping=0.5 but TrainingArguments.max_grad_norm=1.0"),
    ({**ZERO3, "optimizer": {"type": "LOMO", "params": {"clip_grad_norm": 0}}}, {},
     "optimizer.params.clip_grad_norm=0 but TrainingArguments.max_grad_norm=1.0"),
]


@pytest.mark.parametrize("cfg,overrides,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_deepspeed_config_is_one_clear_line(cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, targs(**overrides))
    assert "\n" not in str(info.value)


def test_train_batch_size_is_checked_at_start_up_when_the_launcher_set_world_size(monkeypatch):
    cfg = {**ZERO3, "train_batch_size": 8}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    validate(cfg, targs())  # world unknown before the process group: engine_config checks it later
    monkeypatch.setenv("WORLD_SIZE", "4")
    validate(cfg, targs())  # 2 x 4 = 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train_batch_size=8 but micro batch 2 x 2 processes x 1 accumulation "
                                          r"steps = 4") as info:
        validate(cfg, targs())
    assert "\n" not in str(info.value)
    validate(cfg, targs(gradient_accumulation_steps=2))  # 2 x 2 x 2 = 8


def test_gradient_accumulation_buffers_and_deepspeed_sees_one_micro_step():
    """gas > 1 (TrainingArguments, the JSON "auto"): LOMO gets a buffer (fp32 unless told), DeepSpeed gets
    gradient_accumulation_steps 1 and one micro-step's train_batch_size (it never sees a gradient)."""
    cfg = {**ZERO3, "gradient_accumulation_steps": "auto", "train_batch_size": 16}
    s = validate(cfg, targs(gradient_accumulation_steps=4))
    assert (s.gradient_accumulation_steps, s.accumulation_dtype) == (4, "fp32")
    opt = build_optimizer(s, torch.nn.Linear(2, 2))
    assert opt.buffered and opt.buffer_dtype == torch.float32 and not opt.needs_norm_pass
    engine = engine_config(cfg, targs(gradient_accumulation_steps=4), world_size=2)
    assert (engine["gradient_accumulation_steps"], engine["train_batch_size"]) == (1, 4)
    with pytest.raises(ConfigError, match=r"train_batch_size=16 but micro batch 2 x 2 processes x 2 accumulation"):
        engine_config(cfg, targs(gradient_accumulation_steps=2), world_size=2)
    # the training dtype halves the buffer; clip_mode "buffered" keeps one at a single step (global clipping, 1 pass)
    s = validate(ZERO3, targs(bf16=True, gradient_accumulation_steps=2), LOMOArguments(accumulation_dtype="bf16"))
    assert optimizer_kwargs(s)["buffer_dtype"] == torch.bfloat16
    s = validate(ZERO3, targs(), LOMOArguments(clip_mode="buffered"))
    kwargs = optimizer_kwargs(s)
    assert (kwargs["accumulate"], kwargs["clip_mode"], s.gradient_accumulation_steps) == (True, "global", 1)
    assert optimizer_kwargs(validate(ZERO3, targs()))["accumulate"] is False  # no buffer unless asked


def test_fp16_flag_without_fp16_block_trains_in_fp16():
    """--fp16 true with a DeepSpeed JSON that has no fp16 block: the block counts as {"enabled": "auto"}, so
    DeepSpeed gets fp16 enabled and LOMO gets a loss scaler (it used to train in fp32, silently)."""
    settings = validate(ZERO3, targs(fp16=True))
    assert settings.fp16 and settings.fp16["initial_scale_power"] == 16
    assert engine_config(ZERO3, targs(fp16=True), world_size=1)["fp16"] == {"enabled": True}
    assert "fp16" not in engine_config(ZERO3, targs(), world_size=1)
    assert build_optimizer(settings, torch.nn.Linear(2, 2).half()).loss_scaler is not None
    # a block without "enabled" is "auto" too, and keeps its scaler settings
    cfg = {**ZERO3, "fp16": {"initial_scale_power": 8}}
    assert validate(cfg, targs(fp16=True)).fp16["initial_scale_power"] == 8
    assert engine_config(cfg, targs(fp16=True), world_size=1)["fp16"] == {"enabled": True}
    assert validate(cfg, targs()).fp16 is None
    assert validate(ZERO3, targs(bf16=True)).bf16 and engine_config(ZERO3, targs(bf16=True), 1)["bf16"] == {"enabled": True}
    assert validate(None, targs(fp16=True)).fp16, "without DeepSpeed too: the settings must be truthy"


def test_fp16_on_a_device_deepspeed_refuses_stops_in_validate(monkeypatch):
    fp16_support(monkeypatch, False)
    cfg = {**ZERO3, "fp16": {"enabled": "auto"}}
    with pytest.raises(ConfigError, match=r"fp16 is enabled but this device \(cpu\) has no fp16 support in DeepSpeed: "
                                          r"use bf16 \(--bf16 true\) or fp32") as info:
        validate(cfg, targs(fp16=True))
    assert "\n" not in str(info.value)
    validate(cfg, targs())  # fp16 off: no question asked
    validate(None, targs(fp16=True))  # no DeepSpeed: its gate does not apply
    fp16_support(monkeypatch, True)  # asked again at each call, never cached
    assert validate(cfg, targs(fp16=True)).fp16


def test_optimizer_seed_auto_takes_the_arguments_seed():
    cfg = {**ZERO3, "optimizer": {"type": "LOMO", "params": {"seed": "auto"}}}
    assert validate(cfg, targs(seed=7)).seed == 7


@pytest.mark.parametrize("content, message", [
    (None, r"DeepSpeed config '.*ds.json' does not exist"),
    ("", r"DeepSpeed config .*ds.json is empty: it must hold a JSON object"),
    ("  \n", r"DeepSpeed config .*ds.json is empty"),
    ('{"zero_optimization": {"stage": 3},\n "optimizer": }', r".*ds.json: invalid JSON at line 2 column"),
    ("[1, 2]", r"DeepSpeed config .*ds.json must be a JSON object \{...\}, got a list"),
    ("3", r"DeepSpeed config .*ds.json must be a JSON object \{...\}, got a number"),
])
def test_deepspeed_json_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_json(path)
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
    run.write_text(json.dumps({"model_name_or_path": "m", "learning_rate": 0.1, "output_dir": "o",
                               "clip_grad_value": 0.5, "clip_mode": "global"}))
    r, kwargs, lomo = parse([str(run), "--learning_rate", "0.25", "--max_length", "64", "--clip_mode", "per_param"])
    assert kwargs["learning_rate"] == 0.25 and r.max_length == 64
    assert (lomo.clip_mode, lomo.clip_grad_value, lomo.stochastic_rounding) == ("per_param", 0.5, None)


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


def test_scheduler_block_may_restate_the_arguments():
    """lr_scheduler_type that draws the block's curve, and warmup given once, are one home."""
    validate({**ZERO3, "scheduler": {"type": "WarmupCosineLR"}}, targs(lr_scheduler_type="cosine"))
    validate({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, targs(warmup_steps=10))
    validate({**ZERO3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
             targs(warmup_steps=0.1))
    validate({**ZERO3, "gradient_clipping": 0.0}, targs(max_grad_norm=0.0))


def test_scheduler_is_deepspeeds_own_with_plain_state():
    import io

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    block = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto"}}
    sched = deepspeed_scheduler(block, opt, 20, targs(warmup_steps=4))
    assert type(sched).__module__ == "deepspeed.runtime.lr_schedules"
    assert (sched.warmup_num_steps, sched.total_num_steps, sched.max_lrs) == (4, 20, [0.1])
    sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {"last_batch_iteration": 0}


@pytest.mark.parametrize("sources, message", [
    (dict(lomo_args=LOMOArguments(clip_mode="per_param")), r"clip_mode='per_param' but optimizer.params.clip_mode="
                                                           r"'global': one setting given in two places, keep one"),
    (dict(lomo_args={"clip_mode": "per_param"}), r"lomo_args.clip_mode='per_param' but optimizer.params.clip_mode"),
    (dict(lomo_args=LOMOArguments(stochastic_rounding=True)), r"^stochastic_rounding needs bf16 weights"),
    (dict(lomo_args={"clip_grad_value": -1}), "lomo_args.clip_grad_value must be > 0, got -1"),
    (dict(lomo_args=[1]), r"lomo_args must be LOMOArguments\(...\) or a dict of its fields, got list"),
    (dict(lomo_args={"lr": 0.1}), r"lomo_args has unknown key\(s\) \['lr'\]: allowed are \['accumulation_dtype'"),
])
def test_lomo_setting_in_two_places_is_refused_naming_both(sources, message):
    cfg = {**ZERO3, "optimizer": {"type": "LOMO", "params": {"clip_mode": "global"}}}
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, targs(), **sources)
    assert "\n" not in str(info.value)


def test_lomo_arguments_one_schema_for_every_source():
    """The same settings from LOMOArguments, the DeepSpeed JSON and a dict of LOMOArguments fields."""
    wanted = dict(clip_grad_value=0.5, clip_mode="per_param", stochastic_rounding=True)
    args = targs(bf16=True)
    for cfg, sources in [(ZERO3, dict(lomo_args=LOMOArguments(**wanted, max_consecutive_skips=3))),
                         ({**ZERO3, "optimizer": {"type": "LOMO", "params": wanted}},
                          dict(lomo_args=LOMOArguments(max_consecutive_skips=3))),
                         (None, dict(lomo_args={**wanted, "max_consecutive_skips": 3})),
                         (ZERO3, dict(lomo_args={**wanted, "max_consecutive_skips": 3}))]:
        s = validate(cfg, args, **sources)
        assert (s.clip_grad_value, s.clip_mode, s.stochastic_rounding, s.max_consecutive_skips) == (0.5, "per_param",
                                                                                                     True, 3), sources
    defaults = validate(ZERO3, targs())
    assert (defaults.clip_grad_value, defaults.clip_mode, defaults.stochastic_rounding,
            defaults.max_consecutive_skips) == (None, "auto", False, 5)
    with pytest.raises(ConfigError, match=r"^max_consecutive_skips must be an integer >= 1, got 0$"):
        LOMOArguments(max_consecutive_skips=0)


@pytest.mark.parametrize("keyword, replacement", [
    ("lomo_config", r"lomo_args=LOMOArguments\(...\) with the same keys"),
    ("max_consecutive_skips", r"lomo_args=LOMOArguments\(max_consecutive_skips=...\)"),
])
def test_removed_trainer_keywords_name_their_replacement(keyword, replacement):
    """LOMOTrainer's old keywords are gone (LOMOArguments is the one schema): one line naming what to pass."""
    from lomo_trainer.trainer import LOMOTrainer

    with pytest.raises(ConfigError, match=rf"^LOMOTrainer\({keyword}=...\) was removed: pass {replacement}$") as info:
        LOMOTrainer(args=targs(), **{keyword: 3})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- AdaLomo (issue 13)
ADALOMO = {"zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdaLomo", "params": {"lr": "auto", "clip_threshold": 0.5, "decay_rate": -0.7,
                                                       "eps1": 1e-20, "eps2": "auto"}}}


def test_adalomo_from_the_deepspeed_json_and_from_lomo_arguments():
    from lomo_trainer.optim import AdaLomo

    s = validate(ADALOMO, targs())
    assert s.optimizer == "adalomo" and type(build_optimizer(s, torch.nn.Linear(2, 2))) is AdaLomo
    assert optimizer_kwargs(s)["clip_threshold"] == 0.5 and optimizer_kwargs(s)["eps"] == (1e-20, 1e-3)
    assert optimizer_kwargs(s)["decay_rate"] == -0.7
    s = validate(ZERO3 | {"optimizer": {"type": "adalomo"}}, targs())
    assert s.optimizer == "adalomo" and optimizer_kwargs(s)["clip_threshold"] == 1.0
    s = validate(None, targs(), LOMOArguments(optimizer="AdaLomo", decay_rate=-0.5))
    assert s.optimizer == "adalomo" and optimizer_kwargs(s)["decay_rate"] == -0.5
    assert "clip_threshold" not in optimizer_kwargs(validate(ZERO3, targs()))  # LOMO gets LOMO's arguments


@pytest.mark.parametrize("cfg, sources, message", [
    (ZERO3, dict(lomo_args=LOMOArguments(optimizer="adalomo")),
     r"optimizer='adalomo' but optimizer.type='lomo': one setting given in two places"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO", "params": {"clip_threshold": 1.0}}}, {},
     r"optimizer.params.clip_threshold is an AdaLomo setting but optimizer.type='lomo'"),
    (None, dict(lomo_args=LOMOArguments(decay_rate=-0.8)), r"decay_rate is an AdaLomo setting but the optimizer is LOMO"),
    (ZERO3 | {"optimizer": {"type": "Adam"}}, {}, r'optimizer.type .Adam. is not supported.*"AdaLomo"'),
    (ADALOMO, dict(lomo_args={"decay_rate": 0.5}), r"lomo_args.decay_rate must be a number < 0"),
    (None, dict(lomo_args={"optimizer": "sgd"}), r"lomo_args.optimizer='sgd': use \"lomo\" or \"adalomo\""),
])
def test_adalomo_settings_refused_naming_the_keys(cfg, sources, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(cfg, targs(), **sources)
    assert "\n" not in str(info.value)


def test_cli_optimizer_flag_reaches_lomo_arguments():
    run, _, lomo = parse([os.path.join(ROOT, "configs", "default_cpu.json"), "--optimizer", "adalomo",
                          "--clip_threshold", "0.5"])
    assert (lomo.optimizer, lomo.clip_threshold) == ("adalomo", 0.5)


# ---------------------------------------------------------------- issue 21: optim, accelerate's plugin, plain process
@pytest.mark.parametrize("optim,expected", [("lomo", "lomo"), ("adalomo", "adalomo"), ("adamw_torch", "lomo"),
                                            ("sgd", "lomo")])
def test_training_arguments_optim_lomo_or_adalomo_selects_ours(optim, expected):
    assert validate({"zero_optimization": {"stage": 3}}, targs(optim=optim)).optimizer == expected
    assert validate(None, targs(optim=optim)).optimizer == expected


def test_training_arguments_optim_against_another_source_is_one_line():
    with pytest.raises(ConfigError, match="optimizer.*TrainingArguments.optim='adalomo'"):
        validate(ZERO3 | {"optimizer": {"type": "LOMO"}}, targs(optim="adalomo"))
    with pytest.raises(ConfigError, match="TrainingArguments.optim"):
        validate(None, targs(optim="lomo"), LOMOArguments(optimizer="adalomo"))


def _plugin_args(tmp_path, config, **kw):
    """TrainingArguments as under ``accelerate launch`` with a DEEPSPEED YAML. They set accelerate's state up, which
    starts a process group: the tests that use them run in a forked rank (run_ranks), never in pytest's process."""
    from transformers import TrainingArguments

    path = os.path.join(tmp_path, "ds.json")
    with open(path, "w") as f:
        json.dump(config, f)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what accelerate launch sets from a DEEPSPEED YAML
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = path
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


@pytest.mark.multirank
def test_deepspeed_config_is_read_from_accelerates_plugin(tmp_path):
    run_ranks(_read_from_plugin, 1, str(tmp_path))


def _read_from_plugin(rank, world, tmp_path):
    from lomo_trainer import _hf

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdaLomo", "params": {"lr": "auto"}}}
    args = _plugin_args(tmp_path, cfg, max_grad_norm=0.5, per_device_train_batch_size=3)
    assert args.deepspeed is None and args.deepspeed_plugin is not None
    found, where = _hf.deepspeed_config_source(args)
    assert "accelerate" in where and found["optimizer"]["type"] == "AdaLomo"
    settings = validate(found, args)
    assert settings.optimizer == "adalomo" and settings.clip_grad_norm == 0.5
    engine = engine_config(found, args, 1)
    _hf.set_deepspeed_config(args, engine)
    # what accelerate hands deepspeed.initialize: LOMO's engine config, "auto" filled, no optimizer, held by args as
    # with --deepspeed (so the Trainer does not refill it from the arguments)
    plugin = args.deepspeed_plugin
    assert args.hf_deepspeed_config is plugin.hf_ds_config and plugin.deepspeed_config is plugin.hf_ds_config.config
    assert "optimizer" not in plugin.deepspeed_config and plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3


@pytest.mark.multirank
def test_deepspeed_config_in_the_plugin_is_checked_like_a_json(tmp_path):
    run_ranks(_checked_like_a_json, 1, str(tmp_path))


def _checked_like_a_json(rank, world, tmp_path):
    from lomo_trainer import _hf

    cfg = {"gradient_clipping": 2.0, "zero_optimization": {"stage": 3}}
    args = _plugin_args(tmp_path, cfg, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="gradient_clipping=2.0 but TrainingArguments.max_grad_norm=1.0"):
        validate(_hf.deepspeed_config_source(args)[0], args)


def test_partitioned_model_without_a_deepspeed_config_is_refused_at_start_up(tmp_path):
    from transformers import TrainingArguments

    from lomo_trainer import LOMOTrainer
    from models import tiny_llama

    model = tiny_llama()
    for p in model.parameters():  # what deepspeed.zero.Init leaves on every parameter
        p.ds_tensor, p.ds_numel = p.data.view(-1)[:1], p.numel()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="ZeRO-3 partitioned.*deepspeed=.*accelerate launch"):
        LOMOTrainer(model=model, args=args)


def test_a_plain_process_becomes_a_world_of_one(monkeypatch):
    from lomo_trainer.local_ranks import single_process_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMPI_COMM_WORLD_RANK"):
        monkeypatch.setenv(key, "")  # recorded (absent or not), so what single_process_env sets is undone after
        monkeypatch.delenv(key)
    assert single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_PORT"].isdigit()
    assert not single_process_env()  # a launcher's (or our earlier) world is left alone
