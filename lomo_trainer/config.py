"""LOMO's settings as data: the DeepSpeed JSON, TrainingArguments and LOMOArguments, merged and checked up front.

Users already write DeepSpeed JSON; LOMOTrainer reads the same file:

    "optimizer": {"type": "LOMO", "params": {"lr": "auto", "weight_decay": "auto", "clip_grad_norm": "auto",
                                              "clip_grad_value": null, "clip_mode": "auto",
                                              "stochastic_rounding": true}},
    "scheduler": {"type": "WarmupDecayLR", "params": {...}},   # run by DeepSpeed's own scheduler classes
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": [...],  # optional: LOMO + LoRA (lora.py)
             "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}},
    "fp16": {"enabled": "auto", "initial_scale_power": 16, ...}, "bf16": {"enabled": "auto"},
    "gradient_clipping": "auto", "zero_optimization": {"stage": 3, ...}

"auto" takes the TrainingArguments value, as in HF. Each setting has one home: learning_rate, weight_decay,
seed and max_grad_norm live in TrainingArguments (``optimizer.params`` and ``gradient_clipping`` may only restate
them); LOMO's own settings are ``LOMOArguments`` (run config, command line, ``LOMOTrainer(lomo_args=...)`` or
``optimizer.params``); a ``scheduler`` block owns the schedule (``lr_scheduler_type`` may only restate it).
``validate`` reads every source into one set of stated values (each with the name the user wrote), and raises a
one-line ``ConfigError`` naming the keys where two disagree or a combination cannot work, before any process group
or GPU memory is used. Its result, ``LOMOSettings``, is plain data: optim/factory.py builds the optimizer from it.
The ``optimizer`` and ``scheduler`` blocks are removed from what DeepSpeed sees: LOMO is not a DeepSpeed
optimizer, and DeepSpeed must build its engine without one (no fp32 master copy, no gradient buffers).
Clipping: TrainingArguments.max_grad_norm (1.0 by default, which is also DeepSpeed's default for
``gradient_clipping``); 0 turns norm clipping off and saves the second backward pass.
Gradient accumulation (``gradient_accumulation_steps`` > 1, from TrainingArguments or the JSON) keeps a gradient
buffer of this rank's shards (``accumulation_dtype``); ``clip_mode="buffered"`` keeps one at 1 step too, so that
global clipping and fp16 need one backward per step. ``clip_mode="auto"`` (the default) leaves that choice to
start-up, where the planner says whether the buffer fits (clip_choice.py): validate resolves it to "global" only
where no norm pass exists to save (no norm clipping and no fp16, or accumulation's buffer already there).
DeepSpeed itself always gets gradient_accumulation_steps 1 (it never sees a gradient) and the train_batch_size of
one micro-step.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field, fields

from .errors import ConfigError
from .gathering import device_memory_bytes, fill_auto, model_numels
from .lora_config import check_block
from .loss_scaler import DynamicLossScaler

# optimizer.params keys that restate a TrainingArguments field: "auto" or the same value
RESTATED = {"lr": "learning_rate", "weight_decay": "weight_decay", "clip_grad_norm": "max_grad_norm", "seed": "seed"}
# LOMOArguments fields that optimizer.params may hold (the others are no optimizer keys)
OPTIMIZER_FIELDS = ("clip_grad_value", "clip_mode", "stochastic_rounding", "accumulation_dtype")
ADALOMO_FIELDS = ("clip_threshold", "decay_rate", "eps1", "eps2")  # AdaLomo's own, only with optimizer.type AdaLomo
OPTIMIZER_TYPES = {"lomo": "lomo", "adalomo": "adalomo"}  # optimizer.type, case-insensitive -> LOMOArguments.optimizer
OPTIMIZER_PARAMS = set(RESTATED) | set(OPTIMIZER_FIELDS) | set(ADALOMO_FIELDS)
# TrainingArguments.lr_scheduler_type that draws the same curve as a DeepSpeed scheduler block
HF_EQUIVALENT = {"WarmupLR": "constant_with_warmup", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
FP16_KEYS = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale"}
# DeepSpeed's defaults (runtime/fp16 constants), written out so that an fp16 block is never an empty (falsy) dict
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}
# Parameters of DeepSpeed's schedulers (deepspeed/runtime/lr_schedules.py); all numeric but warmup_type
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps", "cos_min_ratio",
                       "last_batch_iteration"},
}


def load_json(path_or_dict, what: str = "DeepSpeed config") -> dict:
    """A JSON object from a file (or a copy of a dict); every failure names the file."""
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist: pass the path of a JSON file (see configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot be read ({e}): pass a readable UTF-8 JSON file") from None
    if not text.strip():
        raise ConfigError(f"{what} {path} is empty: it must hold a JSON object {{...}}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} must be a JSON object {{...}}, got a {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _auto(value, fallback):
    return fallback if value == "auto" else value


def _number(key: str, value, *, positive: bool = False, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _integer(key: str, value, *, minimum: int = 1, auto: bool = True):
    """An int >= minimum, or "auto" where allowed (returned as is)."""
    if auto and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alternative = ' or "auto"' if auto else ""
        raise ConfigError(f"{key} must be an integer >= {minimum}{alternative}, got {value!r}")
    return value


def _block(parent: dict, key: str, name: str | None = None, example: str = "{...}") -> dict:
    """A nested JSON object: absent gives {}, anything but an object (null, true, a list) is refused."""
    if key not in parent:
        return {}
    value = parent[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{name or key} must be a JSON object like {example}, got {json.dumps(value)}: "
                          "fix it or remove the key")
    return value


@dataclass
class LOMOArguments:
    """LOMO's own settings, one schema for lomo-train's run config and command line (``--clip_mode per_param``),
    ``LOMOTrainer(lomo_args=...)`` and the DeepSpeed JSON's ``optimizer.params``. None means not given: the other
    source, else the default, applies. lr, weight_decay, seed and norm clipping are TrainingArguments' fields
    (learning_rate, weight_decay, seed, max_grad_norm): not repeated here, where they would clash on the command
    line."""

    clip_grad_value: float | None = field(default=None, metadata={
        "help": "clamp each gradient element to [-v, v] (one backward pass); default: off"})
    clip_mode: str | None = field(default=None, metadata={
        "help": '"auto" (default): "buffered" where the planner says its buffer fits this GPU with a 10% margin, '
                'else "global" (always "global" on CPU); "global": exact global-norm clipping at max_grad_norm, two '
                'backward passes (one with gradient accumulation); "buffered": the same from a shard-sized gradient '
                'buffer, one pass, + accumulation_dtype bytes x params / GPUs; "per_param": each gradient clipped on '
                'its own, one pass'})
    stochastic_rounding: bool | None = field(default=None, metadata={
        "help": "bf16 only: write updates back with stochastic rounding; default: false"})
    max_consecutive_skips: int | None = field(default=None, metadata={
        "help": "stop the run after this many steps in a row skipped for a non-finite loss or gradient; default: 5"})
    optimizer: str | None = field(default=None, metadata={
        "help": '"lomo" (default): fused SGD; "adalomo": fused AdaLomo (factored second moment, RMS-scaled step; '
                'arXiv 2310.10195). The DeepSpeed JSON\'s optimizer.type ("LOMO"/"AdaLomo") may restate it'})
    clip_threshold: float | None = field(default=None, metadata={
        "help": "AdaLomo: clip each parameter's update RMS to this; default: 1.0"})
    decay_rate: float | None = field(default=None, metadata={
        "help": "AdaLomo: second-moment decay beta2_t = 1 - t^decay_rate, < 0; default: -0.8"})
    eps1: float | None = field(default=None, metadata={
        "help": "AdaLomo: added to the squared gradient (the references' eps[0]); default: 1e-30"})
    eps2: float | None = field(default=None, metadata={
        "help": "AdaLomo: floor of the parameter RMS that scales the step (the references' eps[1]); default: 1e-3"})
    accumulation_dtype: str | None = field(default=None, metadata={
        "help": 'dtype of the gradient buffer (gradient_accumulation_steps > 1 or clip_mode "buffered"): "fp32" '
                '(default), or the training dtype ("bf16"/"fp16") to halve it; a buffer that clip_mode "auto" '
                'chooses is in the training dtype unless this says otherwise'})
    check_memory: bool | None = field(default=None, metadata={
        "help": "before training, refuse a setting that the planner predicts does not fit this GPU's memory "
                "(any HF causal LM the planner can read); default: false, no check"})
    lora: dict | str | None = field(default=None, metadata={
        "help": 'LOMO + LoRA: peft LoraConfig fields and the adapters\' optimizer, e.g. {"r": 8, "lora_alpha": 16, '
                '"target_modules": ["q_proj", "v_proj"], "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}} '
                '(a JSON string on the command line); the DeepSpeed JSON may hold it as a top-level "lora" block'})

    def __post_init__(self):  # messages start with the field name: optimizer.params prefixes its own
        if self.clip_grad_value is not None:
            self.clip_grad_value = _number("clip_grad_value", self.clip_grad_value, positive=True)
        if self.clip_mode not in (None, "auto", "global", "buffered", "per_param"):
            raise ConfigError(f"clip_mode={self.clip_mode!r}: use \"auto\" (buffered where it fits, else global), "
                              "\"global\" (exact, two backward passes), \"buffered\" (exact, one pass, a gradient "
                              "buffer) or \"per_param\" (one pass)")
        if self.accumulation_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"accumulation_dtype={self.accumulation_dtype!r}: use \"fp32\", \"bf16\" or \"fp16\"")
        if self.check_memory is not None and not isinstance(self.check_memory, bool):
            raise ConfigError(f"check_memory must be true or false, got {json.dumps(self.check_memory)}")
        if self.stochastic_rounding is not None and not isinstance(self.stochastic_rounding, bool):
            raise ConfigError(f"stochastic_rounding must be true or false, got {json.dumps(self.stochastic_rounding)}")
        if self.max_consecutive_skips is not None:
            _integer("max_consecutive_skips", self.max_consecutive_skips, auto=False)
        if self.optimizer is not None:
            if str(self.optimizer).lower() not in OPTIMIZER_TYPES:
                raise ConfigError(f"optimizer={self.optimizer!r}: use \"lomo\" or \"adalomo\"")
            self.optimizer = OPTIMIZER_TYPES[str(self.optimizer).lower()]
        if self.clip_threshold is not None:
            self.clip_threshold = _number("clip_threshold", self.clip_threshold, positive=True)
        if self.decay_rate is not None:
            if isinstance(self.decay_rate, bool) or not isinstance(self.decay_rate, (int, float)) or \
                    not self.decay_rate < 0:
                raise ConfigError(f"decay_rate must be a number < 0 (beta2_t = 1 - t^decay_rate), got "
                                  f"{self.decay_rate!r}")
            self.decay_rate = float(self.decay_rate)
        for key in ("eps1", "eps2"):
            if getattr(self, key) is not None:
                setattr(self, key, _number(key, getattr(self, key)))
        if isinstance(self.lora, str):
            try:
                self.lora = json.loads(self.lora)
            except json.JSONDecodeError as e:
                raise ConfigError(f"lora must be a JSON object, got invalid JSON ({e.msg}): "
                                  f"{self.lora[:60]!r}") from None
        if self.lora is not None:
            check_block(self.lora)

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# what each LOMOArguments field is when no source states it
DEFAULTS = {"clip_grad_value": None, "clip_mode": "auto", "stochastic_rounding": False, "max_consecutive_skips": 5,
            "optimizer": "lomo", "clip_threshold": 1.0, "decay_rate": -0.8, "eps1": 1e-30, "eps2": 1e-3,
            "accumulation_dtype": None, "check_memory": False, "lora": None}


@dataclass
class LOMOSettings:
    """What validate resolved, as plain data: LOMOTrainer builds the optimizer (optim/factory.py) and the scheduler
    from it."""

    lr: float
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    clip_mode: str = "global"  # validate may leave "auto": LOMOTrainer resolves it at start-up (clip_choice.py)
    stochastic_rounding: bool = False
    seed: int = 0
    fp16: dict | None = None      # DeepSpeed-style fp16 block when fp16 is on
    bf16: bool = False
    scheduler: dict | None = None  # DeepSpeed scheduler block, or None for TrainingArguments.lr_scheduler_type
    max_consecutive_skips: int = 5
    optimizer: str = "lomo"         # "lomo" or "adalomo"
    adalomo: dict = field(default_factory=dict)  # clip_threshold, decay_rate, eps: AdaLomo's own arguments
    gradient_accumulation_steps: int = 1
    accumulation_dtype: str | None = None  # the gradient buffer's dtype; None: no buffer (fused update in backward)
    auto_buffer_dtype: str | None = None  # clip_mode "auto": the buffer's dtype should it take the buffered path
    check_memory: bool = False
    lora: dict | None = None  # lora_config.check_block's result: LoraConfig kwargs and the adapters' optimizer
    warnings: list[str] = field(default_factory=list)


def validate(ds_config: dict | None, args, lomo_args: LOMOArguments | dict | None = None, *,
             world_size: int | None = None) -> LOMOSettings:
    """Check a DeepSpeed config (or None: no DeepSpeed) against TrainingArguments ``args`` and ``lomo_args`` (a
    LOMOArguments, or a dict of its fields). A setting stated in two places must agree. An absent ``fp16``/``bf16``
    block (or ``enabled`` key) counts as ``"auto"``, as accelerate fills it: ``--fp16 true`` with such a JSON trains
    in fp16, never silently in fp32."""
    ds = ds_config or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"the DeepSpeed config must be a JSON object, got {_json_type(ds)}")
    if getattr(args, "max_steps", -1) <= 0 and getattr(args, "num_train_epochs", 1) < 0:
        raise ConfigError(f"num_train_epochs={args.num_train_epochs} is negative (with max_steps="
                          f"{args.max_steps}): set num_train_epochs > 0 or max_steps > 0")
    given = _merge(_from_lomo_args(lomo_args) + _from_deepspeed(ds) + _from_training_args(args))
    gas = _accumulation_steps(ds, args)
    warnings = _check_engine(ds, args, gas, world_size) if ds_config is not None else []
    fp16, bf16 = _precision(ds, args, deepspeed=ds_config is not None)
    train = _training_values(given, args)
    lomo = _own_settings(given, gas, "fp16" if fp16 else "bf16" if bf16 else "fp32",
                         norm_pass=train["clip_grad_norm"] is not None or fp16 is not None)
    return LOMOSettings(**train, **lomo, fp16=fp16, bf16=bf16, scheduler=_scheduler(ds, args, train["lr"]),
                        gradient_accumulation_steps=gas, warnings=warnings)


# ---------------------------------------------------------------- the sources, read into one {key: (name, value)}
# Each source gives (name as the user wrote it, LOMOArguments or optimizer.params key, value), in the order that
# error messages name them.

def _from_lomo_args(lomo_args) -> list[tuple[str, str, object]]:
    """LOMOTrainer(lomo_args=...), the run config and the command line (cli.py parses them into LOMOArguments)."""
    if lomo_args is None:
        return []
    if isinstance(lomo_args, LOMOArguments):
        return [(key, key, value) for key, value in lomo_args.given().items()]
    if not isinstance(lomo_args, dict):
        raise ConfigError(f"lomo_args must be LOMOArguments(...) or a dict of its fields, got "
                          f"{type(lomo_args).__name__}")
    return _stated(lomo_args, "lomo_args", set(DEFAULTS))


def _from_deepspeed(ds: dict) -> list[tuple[str, str, object]]:
    """The DeepSpeed JSON: gradient_clipping, a top-level lora block, and the optimizer block's type and params."""
    stated = []
    if ds.get("gradient_clipping", "auto") != "auto":  # DeepSpeed's name for clip_grad_norm
        stated.append(("gradient_clipping", "clip_grad_norm", ds["gradient_clipping"]))
    if ds.get("lora") is not None:  # LOMO + LoRA's block, beside DeepSpeed's own
        try:
            stated.append(("lora (DeepSpeed config)", "lora", LOMOArguments(lora=ds["lora"]).lora))
        except ConfigError as e:
            raise ConfigError(f"{e} (the DeepSpeed config's lora block)") from None
    if "optimizer" in ds:
        opt = _block(ds, "optimizer", example='{"type": "LOMO", "params": {...}}')
        if "type" not in opt:
            raise ConfigError('optimizer must be {"type": "LOMO", "params": {...}} (or "AdaLomo")')
        if str(opt["type"]).lower() not in OPTIMIZER_TYPES:
            raise ConfigError(f"optimizer.type {opt['type']!r} is not supported by LOMOTrainer: set it to \"LOMO\" "
                              "or \"AdaLomo\" (or use transformers.Trainer for DeepSpeed's own optimizers)")
        stated.append(("optimizer.type", "optimizer", OPTIMIZER_TYPES[str(opt["type"]).lower()]))
        stated += _stated(_block(opt, "params", "optimizer.params", '{"lr": "auto"}'), "optimizer.params",
                          OPTIMIZER_PARAMS)
    return stated


def _from_training_args(args) -> list[tuple[str, str, object]]:
    """TrainingArguments(optim="lomo"/"adalomo"): transformers' names for its own LOMO, which LOMOTrainer replaces
    with its own (any other optim value is the stock Trainer's default or choice, and LOMOTrainer is the
    optimizer)."""
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None)) or "").lower()
    if optim in OPTIMIZER_TYPES:
        return [("TrainingArguments.optim", "optimizer", OPTIMIZER_TYPES[optim])]
    return []


def _stated(values: dict, where: str, allowed: set) -> list[tuple[str, str, object]]:
    """What an optimizer.params-like dict states ("auto", and null for a LOMOArguments field, state nothing);
    LOMOArguments fields are checked by its own __post_init__."""
    unknown = set(values) - allowed
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}: allowed are {sorted(allowed)}")
    own = {k: v for k, v in values.items() if k in DEFAULTS and v not in ("auto", None)}
    try:
        LOMOArguments(**own)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None
    return [(f"{where}.{k}", k, v) for k, v in values.items() if v != "auto" and (k in RESTATED or k in own)]


def _merge(stated: list[tuple[str, str, object]]) -> dict:
    """key -> (name, value): one setting stated twice with different values is refused, naming both."""
    given = {}
    for name, key, value in stated:
        if key in given and _differ(given[key][1], value, key):
            raise ConfigError(f"{given[key][0]}={given[key][1]!r} but {name}={value!r}: one setting given in two "
                              "places, keep one")
        given.setdefault(key, (name, value))
    return given


def _differ(a, b, key: str) -> bool:
    if key == "clip_grad_norm":  # 0 and null both turn norm clipping off
        a, b = a or None, b or None
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return not math.isclose(a, b) if numbers else a != b


# ---------------------------------------------------------------- the checks, one concern each
def _accumulation_steps(ds: dict, args) -> int:
    """TrainingArguments' gradient_accumulation_steps, which the JSON may restate."""
    args_gas = _integer("gradient_accumulation_steps (TrainingArguments)", args.gradient_accumulation_steps,
                        auto=False)
    gas = _auto(_integer("gradient_accumulation_steps", ds.get("gradient_accumulation_steps", "auto")), args_gas)
    if gas != args_gas:
        raise ConfigError(f"gradient_accumulation_steps={gas} in the DeepSpeed config but TrainingArguments."
                          f"gradient_accumulation_steps={args_gas}: set one to match or use \"auto\"")
    return gas


def _check_engine(ds: dict, args, gas: int, world_size: int | None = None) -> list[str]:
    """What DeepSpeed's engine is built with: ZeRO stage 3 (the partitioned update), the batch keys, offload.
    Returns the warnings."""
    zero = _block(ds, "zero_optimization", example='{"stage": 3}')
    if zero.get("stage", 0) != 3:
        raise ConfigError(f"zero_optimization.stage={zero.get('stage', 0)!r}: LOMOTrainer's partitioned update needs "
                          "stage 3 (or run without a DeepSpeed config)")
    _check_batch(ds, args, gas, world_size)
    off_param = _block(zero, "offload_param", "zero_optimization.offload_param", '{"device": "cpu"}')
    off_opt = _block(zero, "offload_optimizer", "zero_optimization.offload_optimizer", '{"device": "none"}')
    if off_param.get("device", "none") not in ("cpu", "none"):
        raise ConfigError(f"zero_optimization.offload_param.device={off_param['device']!r} is not supported: "
                          "use 'cpu' or 'none'")
    if off_opt.get("device", "none") != "none":
        return ["zero_optimization.offload_optimizer is ignored: LOMO keeps no optimizer state"]
    return []


def _check_batch(ds: dict, args, gas: int, world_size: int | None = None) -> None:
    """The batch keys against the arguments; the world size is known before the process group only from the
    launcher's WORLD_SIZE, or from the caller (lomo-train without a launcher: 1); engine_config checks again once
    it is certain."""
    per_device = _integer("per_device_train_batch_size", getattr(args, "per_device_train_batch_size", 1), auto=False)
    micro = _auto(_integer("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu", "auto")),
                  per_device)
    if micro != per_device:
        raise ConfigError(f"train_micro_batch_size_per_gpu={micro} but TrainingArguments.per_device_train_batch_size="
                          f"{per_device}: set one to match or use \"auto\"")
    total = _integer("train_batch_size", ds.get("train_batch_size", "auto"))
    world = str(world_size) if world_size is not None else os.environ.get("WORLD_SIZE", "")
    if total != "auto" and world.isdigit() and total != micro * int(world) * gas:
        raise ConfigError(f"train_batch_size={total} but micro batch {micro} x {world} processes x {gas} "
                          f"accumulation steps = {micro * int(world) * gas}: set it to \"auto\"")


def _precision(ds: dict, args, deepspeed: bool) -> tuple[dict | None, bool]:
    """(the fp16 loss-scaler settings, or None; bf16): the JSON's fp16/bf16 blocks against --fp16/--bf16, and
    against what the device supports."""
    fp16_block = _block(ds, "fp16", example='{"enabled": "auto"}')
    bf16_block = _block(ds, "bf16", example='{"enabled": "auto"}')
    for key, block, flag in (("fp16", fp16_block, args.fp16), ("bf16", bf16_block, args.bf16)):
        enabled = block.get("enabled", "auto")
        if enabled != "auto" and not isinstance(enabled, bool):
            raise ConfigError(f'{key}.enabled must be true, false or "auto", got {json.dumps(enabled)}')
        if deepspeed and enabled != "auto" and enabled != bool(flag):
            raise ConfigError(f"{key}.enabled={enabled} in the DeepSpeed config but TrainingArguments.{key}={flag}: "
                              "set one to match or use \"auto\"")
    fp16, bf16 = bool(args.fp16), bool(args.bf16)  # equal to the blocks' "enabled" after the check above
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled: choose one (fp16.enabled / bf16.enabled, --fp16 / --bf16)")
    fp16_cfg = _loss_scaling(fp16_block) if fp16 else None
    if deepspeed:
        _check_device_dtype(fp16, bf16)
    return fp16_cfg, bf16


def _loss_scaling(block: dict) -> dict:
    """The fp16 block's loss-scaler keys, DeepSpeed's defaults filled in; the scaler's own dataclass checks the
    ranges now rather than when LOMO is built after the engine."""
    unknown = set(block) - FP16_KEYS
    if unknown:
        raise ConfigError(f"fp16 has unknown key(s) {sorted(unknown)}: allowed are {sorted(FP16_KEYS)}")
    cfg = {**FP16_DEFAULTS, **{k: v for k, v in block.items() if k not in ("enabled", "auto_cast")}}
    for key, value in cfg.items():
        if key == "consecutive_hysteresis":
            if not isinstance(value, bool):
                raise ConfigError(f"fp16.consecutive_hysteresis must be true or false, got {json.dumps(value)}")
        else:
            _number(f"fp16.{key}", value, allow_none=False)
    try:
        DynamicLossScaler.from_ds_config(cfg)
    except ValueError as e:
        raise ConfigError(f"{e}: fix the DeepSpeed config's fp16 block") from None
    return cfg


def _check_device_dtype(fp16: bool, bf16: bool) -> None:
    """DeepSpeed refuses a dtype its accelerator lacks only inside deepspeed.initialize (engine._do_sanity_check),
    after the process group: ask the same gate now. Asked at every call, never cached: tests patch it."""
    if not (fp16 or bf16):
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if fp16 and not accelerator.is_fp16_supported():
        raise ConfigError(f"fp16 is enabled but this device ({accelerator.device_name()}) has no fp16 support in "
                          "DeepSpeed: use bf16 (--bf16 true) or fp32 (--fp16 false)")
    if bf16 and not accelerator.is_bf16_supported():
        raise ConfigError(f"bf16 is enabled but this device ({accelerator.device_name()}) has no bf16 support in "
                          "DeepSpeed: use fp16 (--fp16 true) or fp32 (--bf16 false)")


def _training_values(given: dict, args) -> dict:
    """lr, weight_decay, clip_grad_norm and seed: TrainingArguments' values, which a LOMO source may only restate
    ("auto" or the same value: DeepSpeed's and HF's rule)."""
    checks = {"lr": lambda k, v: _number(k, v, allow_none=False),
              "weight_decay": lambda k, v: _number(k, v, allow_none=False),
              "clip_grad_norm": _number, "seed": lambda k, v: _integer(k, v, minimum=0, auto=False)}
    values = {}
    for key, home in RESTATED.items():
        values[key] = checks[key](home, getattr(args, home))
        if key in given:
            name, stated = given[key]
            if _differ(checks[key](name, stated), values[key], key):
                raise ConfigError(f"{name}={stated} but TrainingArguments.{home}={values[key]}: set one to match or "
                                  "use \"auto\"")
    values["clip_grad_norm"] = values["clip_grad_norm"] or None  # 0 turns norm clipping off
    return values


def _own_settings(given: dict, gas: int, train_dtype: str, norm_pass: bool = True) -> dict:
    """LOMOArguments' fields as LOMOSettings holds them: each stated value, else its default, checked against the
    optimizer, the gradient buffer (gradient accumulation or clip_mode "buffered") and the training dtype.
    clip_mode "auto" stays "auto" only where a norm pass (``norm_pass``: global-norm clipping or fp16) could be saved
    by a buffer that accumulation does not already keep; elsewhere it is "global", which then costs one pass."""
    lomo = {key: given.get(key, (key, default))[1] for key, default in DEFAULTS.items()}
    auto = lomo["clip_mode"] == "auto" and norm_pass and gas == 1
    if lomo["clip_mode"] == "auto" and not auto:
        lomo["clip_mode"] = "global"
    if lomo["optimizer"] != "adalomo":
        for key in ADALOMO_FIELDS:
            if key in given:
                where = f"{given['optimizer'][0]}={given['optimizer'][1]!r}" if "optimizer" in given else \
                    "the optimizer is LOMO (default)"
                raise ConfigError(f"{given[key][0]} is an AdaLomo setting but {where}: set optimizer to AdaLomo "
                                  "(optimizer.type in the DeepSpeed JSON, or --optimizer adalomo) or remove it")
    buffered = gas > 1 or lomo["clip_mode"] == "buffered"
    acc_dtype = lomo["accumulation_dtype"]
    if acc_dtype is not None and not buffered and not auto:
        raise ConfigError(f"{given['accumulation_dtype'][0]}={acc_dtype!r} but gradient_accumulation_steps=1 and "
                          "clip_mode is not \"buffered\" (nor \"auto\" with norm clipping or fp16): there is no "
                          "gradient buffer; remove it")
    if acc_dtype not in (None, "fp32", train_dtype):
        raise ConfigError(f"{given['accumulation_dtype'][0]}={acc_dtype!r} but the weights train in {train_dtype}: "
                          f"use \"fp32\" or \"{train_dtype}\" (another 16-bit type loses range or precision)")
    if lomo["stochastic_rounding"] and train_dtype != "bf16":
        raise ConfigError(f"{given['stochastic_rounding'][0]} needs bf16 weights: enable bf16 or remove it")
    lomo["accumulation_dtype"] = (acc_dtype or "fp32") if buffered else None
    # the training dtype is exact at one micro-step: the buffer holds one reduced gradient, in the dtype it came in
    lomo["auto_buffer_dtype"] = (acc_dtype or train_dtype) if auto else None
    lomo["lora"] = None if lomo["lora"] is None else check_block(lomo["lora"])
    lomo["adalomo"] = dict(clip_threshold=lomo.pop("clip_threshold"), decay_rate=lomo.pop("decay_rate"),
                           eps=(lomo.pop("eps1"), lomo.pop("eps2")))  # AdaLomo's constructor arguments
    return lomo


def _scheduler(ds: dict, args, lr: float) -> dict | None:
    """The JSON's scheduler block, checked: it owns the schedule."""
    scheduler = ds.get("scheduler")
    if scheduler is None:
        return None
    if not isinstance(scheduler, dict):
        raise ConfigError(f"scheduler must be a JSON object like {{\"type\": \"WarmupDecayLR\", \"params\": {{...}}}}"
                          f", got {json.dumps(scheduler)}")
    _check_scheduler(scheduler, lr)
    _check_one_schedule(scheduler, args)
    return scheduler


def _check_scheduler(scheduler: dict, lr: float) -> None:
    """DeepSpeed scheduler params: known keys, numbers (or "auto"), and a peak lr that agrees with the lr."""
    kind = scheduler.get("type")
    if kind not in SCHEDULER_PARAMS:
        raise ConfigError(f"scheduler.type {kind!r} is not supported: use one of {sorted(SCHEDULER_PARAMS)}, or drop "
                          "the block and set lr_scheduler_type in TrainingArguments")
    params = _block(scheduler, "params", "scheduler.params")
    unknown = set(params) - SCHEDULER_PARAMS[kind]
    if unknown:
        raise ConfigError(f"scheduler.params has unknown key(s) {sorted(unknown)} for {kind}: allowed are "
                          f"{sorted(SCHEDULER_PARAMS[kind])}")
    for key, value in params.items():
        name = f"scheduler.params.{key}"
        if key == "warmup_type":
            if value not in ("log", "linear", "auto"):
                raise ConfigError(f"{name}={value!r}: use \"log\" or \"linear\"")
        elif key in ("warmup_num_steps", "total_num_steps"):
            _integer(name, value, minimum=0)
        elif key == "last_batch_iteration":
            _integer(name, value, minimum=-1, auto=False)
        elif value != "auto":
            _number(name, value, allow_none=False)
    peak = params.get("warmup_max_lr", "auto")
    if peak != "auto" and not math.isclose(peak, lr):
        raise ConfigError(f"scheduler.params.warmup_max_lr={peak} but the optimizer lr is {lr}: "
                          "set one to match or use \"auto\"")


def _check_one_schedule(scheduler: dict, args) -> None:
    """A scheduler block owns the schedule: TrainingArguments may restate it, never contradict it. Its defaults
    (lr_scheduler_type "linear", no warmup) cannot be told from values given on purpose, so they pass."""
    kind = scheduler["type"]
    hf = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if hf not in ("linear", HF_EQUIVALENT[kind]) or args.lr_scheduler_kwargs:
        given = f"lr_scheduler_type={hf}" + (" with lr_scheduler_kwargs" if args.lr_scheduler_kwargs else "")
        raise ConfigError(f"scheduler.type={kind} in the DeepSpeed config but TrainingArguments.{given}: the schedule "
                          "has one home, drop the scheduler block or lr_scheduler_type (and lr_scheduler_kwargs)")
    steps = (scheduler.get("params") or {}).get("warmup_num_steps", "auto")
    warmup = args.warmup_steps or getattr(args, "warmup_ratio", 0)
    if steps != "auto" and warmup and steps != warmup:
        raise ConfigError(f"scheduler.params.warmup_num_steps={steps} in the DeepSpeed config but TrainingArguments."
                          f"warmup_steps={warmup}: keep one (warmup_num_steps \"auto\" takes warmup_steps)")


def engine_config(ds_config: dict, args, world_size: int, model=None) -> dict:
    """The config DeepSpeed gets: no optimizer, no scheduler, every "auto" resolved from ``args`` (and the
    ZeRO-3 gathering limits from ``model``, the world size and the device's memory)."""
    cfg = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "lora"):
        cfg.pop(key, None)
    micro = _auto(cfg.get("train_micro_batch_size_per_gpu", "auto"), args.per_device_train_batch_size)
    if micro != args.per_device_train_batch_size:
        raise ConfigError(f"train_micro_batch_size_per_gpu={micro} but TrainingArguments.per_device_train_batch_size="
                          f"{args.per_device_train_batch_size}: set one to match or use \"auto\"")
    cfg["train_micro_batch_size_per_gpu"] = micro
    gas = args.gradient_accumulation_steps  # validate made the JSON's value agree
    # LOMO accumulates itself: DeepSpeed never sees a gradient, so it gets one micro-step per "step"
    cfg["gradient_accumulation_steps"] = 1
    total = _auto(cfg.get("train_batch_size", "auto"), micro * world_size * gas)
    if total != micro * world_size * gas:
        raise ConfigError(f"train_batch_size={total} but micro batch {micro} x {world_size} processes x {gas} "
                          f"accumulation steps = {micro * world_size * gas}: set it to \"auto\"")
    cfg["train_batch_size"] = micro * world_size
    cfg["gradient_clipping"] = 0.0  # LOMO clips; DeepSpeed never sees a gradient
    for key, flag in (("fp16", args.fp16), ("bf16", args.bf16)):
        # DeepSpeed only casts the module; loss scaling is LOMO's, so its keys stay out. An absent block or
        # "enabled" is "auto" (as validate reads it): --fp16 true must reach DeepSpeed even without a block.
        block = cfg.get(key) or {}
        enabled = bool(_auto(block.get("enabled", "auto"), flag))
        if key in cfg or enabled:
            cfg[key] = {"enabled": enabled}
            if "auto_cast" in block:
                cfg[key]["auto_cast"] = block["auto_cast"]
    zero = cfg.setdefault("zero_optimization", {})
    if model is not None:  # "auto" gathering limits: per-rank memory that falls with the GPU count (gathering.py)
        d = 2 if any((cfg.get(k) or {}).get("enabled") for k in ("fp16", "bf16")) else 4
        zero.update(fill_auto(zero, model_numels(model), world_size, d, device_memory_bytes()))
    for key, value in list(zero.items()):
        if value == "auto":  # bucket sizes HF derives from the hidden size: DeepSpeed's defaults serve LOMO
            del zero[key]
    # save_model gathers the weights itself; this only keeps DeepSpeed's own save path consistent
    zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return cfg


# LOMOTrainer keywords folded into lomo_args: refused by name, with the replacement, rather than Trainer's TypeError
REMOVED_KEYWORDS = {"lomo_config": "lomo_args=LOMOArguments(...) with the same keys",
                    "max_consecutive_skips": "lomo_args=LOMOArguments(max_consecutive_skips=...)"}


def refuse_removed_keywords(kwargs: dict) -> None:
    for key in REMOVED_KEYWORDS:
        if key in kwargs:
            raise ConfigError(f"LOMOTrainer({key}=...) was removed: pass {REMOVED_KEYWORDS[key]}")
