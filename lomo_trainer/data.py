"""Training data: load a hub dataset or local files, tokenise for causal-LM fine-tuning, pad batches.

Two layouts are understood:

* prompt + completion columns: the model sees ``prompt + completion + eos`` and is trained only on the
  completion and the eos (prompt labels are -100);
* a text column: the model is trained on every token of ``text + eos``.

Labels are aligned with ``input_ids`` (``labels[i] == input_ids[i]`` where supervised): HF causal LMs shift
them internally, so position 0 is never a target.
"""
from __future__ import annotations

import os
from typing import Any

import torch

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def build_datasets(tokenizer, *, dataset_name: str | None = None, dataset_config: str | None = None,
                   train_file: str | None = None, validation_file: str | None = None,
                   text_column: str = "text", prompt_column: str = "prompt",
                   completion_column: str = "completion", max_length: int = 512,
                   max_train_samples: int | None = None, max_eval_samples: int | None = None,
                   validation_split: float | int | None = None, seed: int = 0) -> dict:
    """Load, subsample and tokenise; returns ``{"train": Dataset, "validation": Dataset | None}`` with
    columns ``input_ids``, ``attention_mask``, ``labels``.

    ``validation_split`` (a fraction in (0, 1) or a count) carves a seeded validation set out of the
    training data when the source has none. ``max_*_samples`` keep a seeded random subset.
    """
    if max_length < 2:  # one token of context and one target at the least
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1 or None, got {value}")
    if validation_split is not None and not (0 < validation_split < 1 or
                                             (isinstance(validation_split, int) and validation_split >= 1)):
        raise ValueError(f"validation_split must be a fraction in (0, 1) or a count >= 1, got {validation_split}")

    raw = _load_raw(dataset_name, dataset_config, train_file, validation_file)
    train, validation = raw["train"], raw.get("validation")
    if validation_split is not None:
        if validation is not None:
            raise ValueError(f"validation_split={validation_split} but the data already has a validation set: "
                             "unset validation_split (or validation_file)")
        parts = train.train_test_split(test_size=validation_split, seed=seed)
        train, validation = parts["train"], parts["test"]

    # The training columns pick the layout; a validation set must have the same columns.
    columns = _layout(train.column_names, text_column, prompt_column, completion_column, "train")
    missing = [c for c in columns if validation is not None and c not in validation.column_names]
    if missing:
        raise ValueError(f"validation dataset has no column {missing[0]!r} (columns: {validation.column_names}): "
                         "give it the training data's columns")
    tokenize = _make_tokenize(tokenizer, columns, max_length)
    out = {"train": _prepare(train, tokenize, max_train_samples, seed),
           "validation": None if validation is None else _prepare(validation, tokenize, max_eval_samples, seed)}
    if len(out["train"]) == 0:
        raise ValueError("no training example has a supervised token left: check max_length and the columns")
    return out


def _load_raw(dataset_name, dataset_config, train_file, validation_file) -> dict:
    import datasets

    if dataset_name and train_file:
        raise ValueError("both dataset_name and train_file are set: use one source")
    if dataset_name:
        if validation_file:
            raise ValueError("validation_file is only used with train_file: unset it or use train_file")
        loaded = datasets.load_dataset(dataset_name, dataset_config)
        if "train" not in loaded:
            raise ValueError(f"dataset {dataset_name!r} has no 'train' split (splits: {list(loaded)}): "
                             "set train_file to local data instead")
        # Hub datasets name their held-out split either way; prefer "validation".
        held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
        return {"train": loaded["train"], "validation": held_out}
    if not train_file:
        if validation_file:
            raise ValueError("validation_file is set but train_file is not: set train_file too")
        raise ValueError("no training data: set dataset_name (a hub dataset) or train_file (local json/jsonl/csv/txt)")

    builder = None
    for key, path in (("train_file", train_file), ("validation_file", validation_file)):
        if path is None:
            continue
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise ValueError(f"{key}={path!r} has an unsupported extension: use .json, .jsonl, .csv or .txt")
        if not os.path.isfile(path):
            raise ValueError(f"{key}={path!r} does not exist")
        if builder not in (None, _BUILDERS[ext]):
            raise ValueError(f"validation_file={path!r} is not in train_file's format: use the same kind of file")
        builder = _BUILDERS[ext]
    # One load per file: loaded together, files must share a schema, and a mismatch would surface as an
    # opaque cast error instead of the column check's message.
    load = lambda path: datasets.load_dataset(builder, data_files=path, split="train")  # noqa: E731
    return {"train": load(train_file), "validation": load(validation_file) if validation_file else None}


def _layout(columns, text_column, prompt_column, completion_column, split) -> tuple[str, ...]:
    """The columns to read: (prompt, completion) when both are there, else (text,)."""
    if prompt_column in columns and completion_column in columns:
        return (prompt_column, completion_column)
    if text_column in columns:
        return (text_column,)
    if prompt_column in columns:
        missing, fix = completion_column, "set completion_column or text_column"
    elif completion_column in columns:
        missing, fix = prompt_column, "set prompt_column or text_column"
    else:
        missing, fix = text_column, "set text_column, or prompt_column and completion_column"
    raise ValueError(f"{split} dataset has no column {missing!r} (columns: {list(columns)}): {fix}")


def _make_tokenize(tokenizer, columns, max_length):
    """A batched map function for the layout given by ``columns``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if len(columns) == 2:
        prompt_column, completion_column = columns

        def tokenize(batch):
            # Prompt and completion are tokenised apart and the ids concatenated, so the boundary is exact.
            # Special tokens (e.g. BOS) go before the prompt only.
            prompts = tokenizer(_strings(batch[prompt_column], prompt_column), add_special_tokens=True)["input_ids"]
            completions = tokenizer(_strings(batch[completion_column], completion_column),
                                    add_special_tokens=False)["input_ids"]
            return _assemble([(p, c + eos) for p, c in zip(prompts, completions)], max_length)
        return tokenize

    (text_column,) = columns

    def tokenize(batch):
        texts = tokenizer(_strings(batch[text_column], text_column), add_special_tokens=True)["input_ids"]
        # A text is the completion of an empty prompt: every token is a target, the start survives truncation.
        return _assemble([([], t + eos) for t in texts], max_length)
    return tokenize


def _strings(values, column):
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"column {column!r} holds a {type(v).__name__}, not text: point the column "
                             "setting at a string column")
    return values


def _assemble(pairs, max_length) -> dict:
    """(prompt ids, completion ids) pairs -> input_ids/attention_mask/labels, truncated to max_length."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, completion in pairs:
        room = max_length - len(completion)
        if room < len(prompt):
            if room >= 1:
                prompt = prompt[len(prompt) - room:]  # drop the prompt's start: the completion survives
            else:
                # The completion alone is too long: keep the prompt's last token (it predicts the first
                # completion token) and cut the completion's end.
                prompt = prompt[-1:]
                completion = completion[:max_length - len(prompt)]
        ids = prompt + completion
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
    return out


def _prepare(ds, tokenize, max_samples, seed):
    if max_samples is not None and max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_samples))  # subsample before tokenising: cheaper
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenising")
    # labels[0] is never a target after the shift, so an example needs a supervised label past position 0.
    return ds.filter(lambda labels: any(l != IGNORE_INDEX for l in labels[1:]), input_columns="labels",
                     desc="dropping unsupervised examples")


class CausalLMCollator:
    """Right-pads a list of tokenised examples into tensors: ``input_ids`` with the pad id (eos when the
    tokenizer has no pad token), ``labels`` with -100, ``attention_mask`` with 0."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer has neither pad_token nor eos_token: set tokenizer.pad_token")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(seqs, value):
            return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs], dtype=torch.long)

        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([f.get("attention_mask") or [1] * len(i) for f, i in zip(features, ids)], 0),
            "labels": pad([f.get("labels") or list(i) for f, i in zip(features, ids)], IGNORE_INDEX),
        }
