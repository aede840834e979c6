"""``lomo-train RUN.json [--key value ...]`` (or ``python -m lomo_trainer RUN.json``): config-driven fine-tuning.

A run config is one JSON object: the fields of ``RunArguments`` below, of ``LOMOArguments`` (config.py: clip_mode,
clip_grad_value, stochastic_rounding, max_consecutive_skips) and any ``TrainingArguments`` field (``deepspeed`` names
the DeepSpeed JSON). ``--key value`` on the command line overrides the file. Works under
``deepspeed --num_gpus 8``, ``torchrun``, ``accelerate launch`` or a plain process. Bad input stops with one
line naming the key, before a model, a dataset or DeepSpeed is touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

from . import _hf, ranks
from .config import LOMOArguments, load_json, validate
from .errors import ConfigError, Interrupted, SaveFailed, TrainingDiverged

logger = logging.getLogger("lomo_trainer")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RunArguments:
    """Model and data of a run (TrainingArguments carries the rest)."""

    model_name_or_path: str = field(metadata={"help": "hub id or local folder (config + tokenizer, weights unless "
                                                      "init_from_scratch)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "defaults to model_name_or_path"})
    init_from_scratch: bool = field(default=False, metadata={"help": "random weights from the model's config"})
    dataset_name: str | None = field(default=None, metadata={"help": "a hub dataset"})
    dataset_config: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "local json/jsonl/csv/txt"})
    validation_file: str | None = None
    validation_split: float | None = field(default=None, metadata={"help": "carve validation out of train"})
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_choices: list[str] | None = field(default=None, metadata={
        "help": "completions to rank by log-likelihood on the validation prompts after training: reports accuracy"})


def _resolve(path: str | None, base: str) -> str | None:
    """Paths in a run config: as given (relative to the working directory), else relative to the config file,
    else to the project root, so the shipped configs run from anywhere."""
    if not path or os.path.exists(path):
        return path
    for root in (base, PROJECT_ROOT):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path


def parse(argv: list[str]):
    """RUN.json + overrides -> (RunArguments, TrainingArguments kwargs, LOMOArguments); no process group is created
    here."""
    from transformers import HfArgumentParser, TrainingArguments

    # the deepspeed launcher puts --local_rank=N first; the rank comes from the environment anyway
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: lomo-train RUN.json [--key value ...]  (see configs/ for run configs)")
    run_file, overrides = argv[0], argv[1:]
    if not os.path.isfile(run_file):
        raise ConfigError(f"run config {run_file!r} does not exist: pass a JSON file such as configs/default_cpu.json")
    values = load_json(run_file, "run config")
    if "lomo_config" in values:  # its keys are LOMOArguments fields now
        raise ConfigError(f"{run_file}: lomo_config is no longer read: write its keys (clip_mode, clip_grad_value, "
                          "stochastic_rounding) at the top level; lr, weight_decay, seed, clip_grad_norm are "
                          "learning_rate, weight_decay, seed, max_grad_norm")
    classes = (RunArguments, LOMOArguments, TrainingArguments)
    # no abbreviations: --learning_rat must be refused on the command line as it is in the file
    parser = HfArgumentParser(classes, allow_abbrev=False, exit_on_error=False)
    parser.error = _parser_error
    unknown = sorted(set(values) - _hf.parser_keys(parser))
    if unknown:
        raise ConfigError(f"{run_file}: unknown key(s) {unknown}: use RunArguments, LOMOArguments or "
                          "TrainingArguments field names")
    _check_types(values, run_file, classes)
    _hf.set_file_values(parser, values)
    try:
        namespace, rest = parser.parse_known_args(args=overrides)
    except argparse.ArgumentError as e:  # a value argparse could not convert: one line, no usage text
        raise ConfigError(f"{e.argument_name or 'command line'}: {e.message}: give a value of the field's type"
                          ) from None
    if rest:
        raise ConfigError(f"unknown command-line argument(s) {rest}: use --key value with field names "
                          "(written out in full)")
    values = vars(namespace)
    base = os.path.dirname(os.path.abspath(run_file))
    for key in ("model_name_or_path", "tokenizer_name", "train_file", "validation_file"):
        values[key] = _resolve(values[key], base)
    deepspeed = values["deepspeed"]
    values["deepspeed"] = _resolve(deepspeed, base) if isinstance(deepspeed, str) else deepspeed
    values["resume_from_checkpoint"] = _resume_value(values.get("resume_from_checkpoint"))
    run = RunArguments(**{f.name: values[f.name] for f in dataclasses.fields(RunArguments)})
    lomo = LOMOArguments(**{f.name: values[f.name] for f in dataclasses.fields(LOMOArguments)})
    # TrainingArguments is built here for its own checks and normalised values, without the DeepSpeed JSON (it
    # would read that through accelerate, whose errors are long tracebacks; prevalidate reads it instead) and
    # without devices (under a launcher that would initialise the process group before any input is checked).
    try:
        targs = _hf.arguments_for_checks(TrainingArguments, **{
            f.name: values[f.name] for f in dataclasses.fields(TrainingArguments) if f.init and f.name != "deepspeed"})
    except ValueError as e:
        raise ConfigError(f"TrainingArguments: {str(e).strip().splitlines()[0]}") from None
    kwargs = {f.name: getattr(targs, f.name) for f in dataclasses.fields(targs) if f.init}
    return run, {**kwargs, "deepspeed": values["deepspeed"]}, lomo


def _parser_error(message: str):
    """argparse's error() prints the whole usage and exits; here it is one line."""
    raise ConfigError(f"{message}: use --key value with field names")


def _resume_value(value):
    """`--resume_from_checkpoint true` (or JSON true) means the latest checkpoint in output_dir:
    Trainer.train takes a Python True for that; "false" means none; anything else is a path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    return True if value is True else (value or None)


def _check_types(values: dict, run_file: str, classes) -> None:
    """Run-config values against the dataclass field types: argparse converts only string defaults, so a JSON
    value of the wrong type would otherwise fail later, or be taken as is."""
    import typing

    hints = {}
    for cls in classes:
        try:
            hints.update(typing.get_type_hints(cls))
        except Exception:  # an annotation this Python cannot evaluate: leave those fields to argparse
            pass
    for key, value in values.items():
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            continue  # true: the latest checkpoint in output_dir
        if key in hints and _accepts(hints[key], value) is False:
            raise ConfigError(f"{run_file}: {key}={json.dumps(value)} must be {_describe(hints[key])}")


def _accepts(tp, value):
    """True/False when ``value`` fits annotation ``tp``; None when the annotation is not understood."""
    import enum
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        results = [_accepts(a, value) for a in args]
        return True if True in results else (None if None in results else False)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}
    if origin is typing.Literal:
        return value in args
    if origin is list or tp is list:
        return isinstance(value, list) and all(_accepts(args[0], v) is not False for v in value) if args else \
            isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return None


def _describe(tp) -> str:
    import enum
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a JSON object"}
    if tp in names:
        return names[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[m.value for m in tp]}"
    if origin is list:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # DeepSpeed still calls collectives that torch 2.13 renamed: one warning per call and rank is noise
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    # _train's TrainingArguments creates the process group under a launcher; one that a caller set up (a test, a
    # notebook) is the caller's to end
    created_here = not ranks.initialized()
    try:
        from .data import precheck_data

        run, targs_kwargs, lomo = parse(argv)
        prevalidate(targs_kwargs, lomo)
        precheck_run(run, targs_kwargs)
        precheck_model(run, targs_kwargs)
        precheck_data(run)
        lock_output_dir(targs_kwargs)
        code = _train(run, targs_kwargs, lomo)
        if code == 0:
            ranks.leave(created_here)
        return code
    except ConfigError as e:  # before the process group, or a data/config error found later: one line either way
        print(f"lomo-train: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, SaveFailed) as e:  # nothing non-finite or unfinished was saved; checkpoints before stay
        print(f"lomo-train: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGTERM or Ctrl-C during training: saved what a step had changed since the last save
        print(f"lomo-train: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second one): nothing trained to save
        print("lomo-train: stopped by Ctrl-C (SIGINT) before training: nothing saved", file=sys.stderr)
        return 128 + 2


def prevalidate(targs_kwargs: dict, lomo: LOMOArguments | None = None) -> None:
    """Validate the DeepSpeed JSON against the arguments before the process group: TrainingArguments built
    without it, and without devices (either would initialise the process group)."""
    from transformers import TrainingArguments

    ds = targs_kwargs.get("deepspeed")
    # without a launcher lomo-train runs as a world of one (_single_process_env): the batch keys are checked for it
    launched = any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"))
    args = _hf.arguments_for_checks(TrainingArguments, **{**targs_kwargs, "deepspeed": None})
    validate(load_json(ds) if ds else None, args, lomo, world_size=None if launched else 1)
    resume = targs_kwargs.get("resume_from_checkpoint")
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint={resume!r} does not exist: pass a checkpoint-N folder, or true "
                          "for the latest one in output_dir")


def precheck_run(run: RunArguments, targs_kwargs: dict) -> None:
    """What the run as a whole needs, before any process group: a number of steps, a folder to write to, and an
    evaluation set when evaluation is asked for."""
    epochs, max_steps = targs_kwargs.get("num_train_epochs", 3.0), targs_kwargs.get("max_steps", -1)
    if (max_steps is None or max_steps <= 0) and not (epochs and epochs > 0):
        raise ConfigError(f"num_train_epochs={epochs} with max_steps={max_steps} trains nothing (and would save the "
                          "untrained model as the result): set num_train_epochs > 0 or max_steps > 0")
    out = targs_kwargs.get("output_dir")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir={out!r} is a file: pass a folder (it is created if missing)")
    strategy = getattr(targs_kwargs.get("eval_strategy"), "value", targs_kwargs.get("eval_strategy"))
    has_eval = run.validation_file or run.validation_split or run.dataset_name
    if strategy not in (None, "no") and not has_eval:
        raise ConfigError(f"eval_strategy={strategy!r} but there is no evaluation set: set validation_file (or "
                          "validation_split), or eval_strategy \"no\"")
    if run.eval_choices and not (run.validation_file or run.dataset_name):
        raise ConfigError("eval_choices needs validation_file or a dataset_name with a validation split")


def lock_output_dir(targs_kwargs: dict) -> None:
    """The first process of a run takes output_dir's lock before any process group (LOMOTrainer.train takes it
    again, a no-op in the same process): a second run in the same folder stops here with one line."""
    from .checkpoint import lock_output_dir as lock

    if os.environ.get("RANK", "0") == "0" and targs_kwargs.get("output_dir"):
        lock(targs_kwargs["output_dir"])


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def precheck_model(run: RunArguments, targs_kwargs: dict | None = None) -> None:
    """The model folder before any process group: from_pretrained's own errors come late and misleading (a
    missing local path reads "Repo id must be in the form ...")."""
    for key in ("model_name_or_path", "tokenizer_name"):
        path = getattr(run, key)
        if path is None:
            continue
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key} must be a local folder or a hub id such as org/name, got {path!r}")
        if not os.path.exists(path):
            _check_hub_id(key, path)
            continue
        if not os.path.isdir(path):
            raise ConfigError(f"{key}={path!r} is a file: pass the folder that holds config.json and the tokenizer")
        files = set(os.listdir(path))
        if not files:
            raise ConfigError(f"{key}={path!r} is an empty folder: pass a folder with config.json, the tokenizer "
                              "files and the weights (a save_pretrained folder)")
        if key == "model_name_or_path" and "config.json" not in files:
            raise ConfigError(f"{key}={path!r} has no config.json: pass a save_pretrained folder (config.json, "
                              "tokenizer, weights) or a hub id")
        if key == "model_name_or_path" and not run.init_from_scratch and not files & set(WEIGHTS):
            raise ConfigError(f"{key}={path!r} has no weights ({' / '.join(WEIGHTS[::2])}): pass a folder with "
                              "weights, or init_from_scratch true for random weights")
        if key == "model_name_or_path" and not run.init_from_scratch:
            _check_safetensors_headers(path, files)
    _check_config_and_tokenizer(run)


def _local_dir(path) -> bool:
    return isinstance(path, str) and os.path.isdir(path)


def _check_safetensors_headers(path: str, files: set) -> None:
    """Each *.safetensors file's header (a few bytes: no tensor is read): a truncated or corrupt file is named here,
    not as a bare SafetensorError from deep inside from_pretrained."""
    from safetensors import safe_open

    for name in sorted(f for f in files if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' own error types vary by version
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(f"model weights file {os.path.join(path, name)!r} cannot be read ({reason}): it is "
                              "truncated or corrupt; download or save it again") from None


def _check_config_and_tokenizer(run: RunArguments) -> None:
    """The model's config.json and the tokenizer, for local folders: a config transformers can read, a tokenizer
    with a pad or eos token (the collator pads with it), and no token id past the model's embedding."""
    model_dir = run.model_name_or_path if _local_dir(run.model_name_or_path) else None
    config = None
    if model_dir is not None:
        config_file = os.path.join(model_dir, "config.json")
        load_json(config_file, "model config")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError or OSError here
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{config_file} cannot be used ({reason}): fix model_type and the other keys, or "
                              "pass a save_pretrained folder") from None
    tokenizer_dir = run.tokenizer_name or run.model_name_or_path
    if not _local_dir(tokenizer_dir):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"the tokenizer in {tokenizer_dir!r} cannot be loaded ({reason}): pass a folder with the "
                          "tokenizer files (tokenizer_name)") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {tokenizer_dir!r} has neither a pad nor an eos token: batches cannot be "
                          "padded; add one (e.g. eos_token in tokenizer_config.json)")
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: token "
                          f"ids >= {vocab} have no embedding; use the model's own tokenizer, or resize the model's "
                          "embeddings and save it first")


def _check_hub_id(key: str, name: str) -> None:
    """A name that is not a local path may be a hub id: allowed through when online, looked up in the local
    cache when HF_HUB_OFFLINE is set."""
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name):  # "name" or "org/name", not a path like ./x or /x
        raise ConfigError(f"{key}={name!r} does not exist: pass an existing local folder or a hub id such as org/name")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json" if key == "model_name_or_path" else "tokenizer_config.json")
        if not isinstance(cached, str):
            raise ConfigError(f"{key}={name!r} is not a local folder and HF_HUB_OFFLINE=1: it is not found locally "
                              "(not in the hub cache); pass a local folder, or download it first with HF_HUB_OFFLINE "
                              "unset")


def _train(run: RunArguments, targs_kwargs: dict, lomo: LOMOArguments) -> int:
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from .data import CausalLMCollator, build_datasets
    from .errors import TrainingDiverged
    from .trainer import LOMOTrainer

    _single_process_env()
    try:
        args = TrainingArguments(**targs_kwargs)  # before the model: keeps DeepSpeed's zero.Init config alive
    except ValueError as e:  # HF's own DeepSpeed config checks: prevalidate should have caught them first
        raise ConfigError(f"TrainingArguments: {(str(e).strip().splitlines() or ['invalid'])[0]}") from None
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_name or run.model_name_or_path)
    # what evaluation reads after training is read now: a file changed or removed mid-run cannot break the end
    choice_rows = load_choice_rows(run) if run.eval_choices else None
    data = build_datasets(tokenizer, dataset_name=run.dataset_name, dataset_config=run.dataset_config,
                          train_file=run.train_file, validation_file=run.validation_file,
                          text_column=run.text_column, prompt_column=run.prompt_column,
                          completion_column=run.completion_column, max_length=run.max_length,
                          max_train_samples=run.max_train_samples, max_eval_samples=run.max_eval_samples,
                          validation_split=run.validation_split, seed=args.seed)
    model = build_model(run, args)
    trainer = LOMOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer,
                          lomo_args=lomo)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
        trainer.save_model()
        trainer.save_state()  # trainer_state.json with the log history, as HF scripts leave it
    except TrainingDiverged as e:  # nothing non-finite was saved; checkpoints written before stay
        print(f"lomo-train: error: {e}", file=sys.stderr)
        return 1
    if run.eval_choices:
        accuracy = choice_accuracy(trainer, tokenizer, run, choice_rows)
        trainer.log({"eval_choice_accuracy": accuracy})
        if trainer.is_world_process_zero():
            print(f"held-out accuracy: {accuracy:.4f} over {len(run.eval_choices)} choices "
                  f"(chance {1 / len(run.eval_choices):.2f})")
            with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
                json.dump({"choice_accuracy": accuracy}, f, indent=2)
    return 0


def build_model(run: RunArguments, args, dtype=None):
    """The model in the training dtype (LOMO keeps no fp32 master copy). Call after TrainingArguments: with a
    ZeRO-3 config the weights are then partitioned while loading (zero.Init)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32)
    if run.init_from_scratch:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run.model_name_or_path), dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(run.model_name_or_path, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a weights file that does not load: one line naming it
        import pickle

        files = [os.path.join(run.model_name_or_path, f) for f in WEIGHTS
                 if os.path.isdir(run.model_name_or_path) and os.path.isfile(os.path.join(run.model_name_or_path, f))]
        where = " / ".join(files) or run.model_name_or_path
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise ConfigError(f"{where} holds pickled objects that are not plain tensors: refused, as loading it could "
                              "run code; convert it to model.safetensors from a trusted copy") from None
        if isinstance(e, (OSError, ValueError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{where} cannot be loaded ({type(e).__name__}: {reason})") from None
        raise


def _single_process_env() -> None:
    """Started without a launcher: describe a world of one, or DeepSpeed falls back to MPI discovery."""
    from .local_ranks import single_process_env

    single_process_env()


def load_choice_rows(run: RunArguments) -> list[dict]:
    """The validation rows ``eval_choices`` ranks, read once at start-up and checked against the choices."""
    import datasets

    if run.validation_file:
        rows = list(datasets.load_dataset("json", data_files=run.validation_file, split="train"))
    elif run.dataset_name:
        rows = list(datasets.load_dataset(run.dataset_name, run.dataset_config, split="validation"))
    else:
        raise ConfigError("eval_choices needs validation_file or a dataset_name with a validation split")
    if run.max_eval_samples:
        rows = rows[: run.max_eval_samples]
    choices = list(run.eval_choices)
    missing = [r[run.completion_column] for r in rows if r[run.completion_column] not in choices]
    if missing:
        raise ConfigError(f"validation completion {missing[0]!r} is not among eval_choices {choices}")
    return rows


def choice_accuracy(trainer, tokenizer, run: RunArguments, rows: list[dict] | None = None) -> float:
    """Accuracy of picking the gold completion among ``eval_choices`` by summed log-likelihood."""
    from .ranking import pick, score_candidates

    rows = load_choice_rows(run) if rows is None else rows
    choices = list(run.eval_choices)
    requests = [(r[run.prompt_column], choices) for r in rows]
    # scored as trained: completion + EOS, truncated to the training max_length
    scores = score_candidates(trainer.model, tokenizer, requests, batch_size=trainer.args.per_device_eval_batch_size,
                              device=trainer.args.device, max_length=run.max_length, add_eos=True)
    right = sum(pick(s) == choices.index(r[run.completion_column]) for s, r in zip(scores, rows))
    return right / max(len(rows), 1)


if __name__ == "__main__":
    sys.exit(main())
