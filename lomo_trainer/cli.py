"""``lomo-train RUN.json [--key value ...]`` (or ``python -m lomo_trainer RUN.json``): config-driven fine-tuning.

A run config is one JSON object: the fields of ``RunArguments`` below plus any ``TrainingArguments`` field
(``deepspeed`` names the DeepSpeed JSON). ``--key value`` on the command line overrides the file. Works under
``deepspeed --num_gpus 8``, ``torchrun``, ``accelerate launch`` or a plain process. Bad input stops with one
line naming the key, before a model, a dataset or DeepSpeed is touched.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field

from .config import ConfigError, load_json, validate

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
    lomo_config: str | None = field(default=None, metadata={
        "help": "JSON object of LOMO params for runs without a DeepSpeed config (keys of optimizer.params)"})


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
    """RUN.json + overrides -> (RunArguments, TrainingArguments kwargs); no process group is created here."""
    from transformers import HfArgumentParser, TrainingArguments

    # the deepspeed launcher puts --local_rank=N first; the rank comes from the environment anyway
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: lomo-train RUN.json [--key value ...]  (see configs/ for run configs)")
    run_file, overrides = argv[0], argv[1:]
    values = load_json(run_file) if os.path.isfile(run_file) else None
    if values is None:
        raise ConfigError(f"run config {run_file!r} does not exist: pass a JSON file such as configs/default_cpu.json")
    if not isinstance(values, dict):
        raise ConfigError(f"{run_file}: a run config must be a JSON object")
    parser = HfArgumentParser((RunArguments, TrainingArguments))
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{run_file}: unknown key(s) {unknown}: use RunArguments or TrainingArguments field names")
    parser.set_defaults(**{k: v for k, v in values.items()})
    for action in parser._actions:  # a value in the file satisfies a required flag
        if action.dest in values:
            action.required = False
    try:
        run, targs, rest = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except SystemExit:
        raise ConfigError(f"bad command-line override in {overrides}: use --key value with field names") from None
    if rest:
        raise ConfigError(f"unknown command-line argument(s) {rest}: use --key value with field names")
    base = os.path.dirname(os.path.abspath(run_file))
    for key in ("model_name_or_path", "tokenizer_name", "train_file", "validation_file"):
        setattr(run, key, _resolve(getattr(run, key), base))
    kwargs = {f.name: getattr(targs, f.name) for f in dataclasses.fields(targs) if f.init}
    if kwargs.get("deepspeed"):
        kwargs["deepspeed"] = _resolve(kwargs["deepspeed"], base)
    return run, kwargs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # DeepSpeed still calls collectives that torch 2.13 renamed: one warning per call and rank is noise
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    try:
        run, targs_kwargs = parse(argv)
        lomo_config = json.loads(run.lomo_config) if run.lomo_config else None
        prevalidate(targs_kwargs, lomo_config)
    except (ConfigError, json.JSONDecodeError) as e:
        print(f"lomo-train: error: {e}", file=sys.stderr)
        return 2
    return _train(run, targs_kwargs, lomo_config)


def prevalidate(targs_kwargs: dict, lomo_config) -> None:
    """Validate the DeepSpeed JSON against the arguments before TrainingArguments exists (with a DeepSpeed
    config it initialises the process group)."""
    ns = dataclasses.make_dataclass("Args", list(targs_kwargs))(**targs_kwargs)
    ns.seed = targs_kwargs.get("seed", 42)
    ds = load_json(targs_kwargs["deepspeed"]) if targs_kwargs.get("deepspeed") else None
    validate(ds, ns, lomo_config)


def _train(run: RunArguments, targs_kwargs: dict, lomo_config) -> int:
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from .data import CausalLMCollator, build_datasets
    from .trainer import LOMOTrainer

    _single_process_env()
    args = TrainingArguments(**targs_kwargs)  # before the model: keeps DeepSpeed's zero.Init config alive
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_name or run.model_name_or_path)
    data = build_datasets(tokenizer, dataset_name=run.dataset_name, dataset_config=run.dataset_config,
                          train_file=run.train_file, validation_file=run.validation_file,
                          text_column=run.text_column, prompt_column=run.prompt_column,
                          completion_column=run.completion_column, max_length=run.max_length,
                          max_train_samples=run.max_train_samples, max_eval_samples=run.max_eval_samples,
                          validation_split=run.validation_split, seed=args.seed)
    model = build_model(run, args)
    trainer = LOMOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer,
                          lomo_config=lomo_config)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    trainer.save_model()
    if run.eval_choices:
        accuracy = choice_accuracy(trainer, tokenizer, run)
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
    return AutoModelForCausalLM.from_pretrained(run.model_name_or_path, dtype=dtype)


def _single_process_env() -> None:
    """Started without a launcher: describe a world of one, or DeepSpeed falls back to MPI discovery."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    from .ranks import _free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def choice_accuracy(trainer, tokenizer, run: RunArguments) -> float:
    """Accuracy of picking the gold completion among ``eval_choices`` by summed log-likelihood."""
    import datasets

    from .ranking import pick, score_candidates

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
    requests = [(r[run.prompt_column], choices) for r in rows]
    scores = score_candidates(trainer.model, tokenizer, requests, batch_size=trainer.args.per_device_eval_batch_size,
                              device=trainer.args.device)
    right = sum(pick(s) == choices.index(r[run.completion_column]) for s, r in zip(scores, rows))
    return right / max(len(rows), 1)


if __name__ == "__main__":
    sys.exit(main())
