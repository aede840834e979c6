"""Training data: load a hub dataset or local files, tokenise for causal-LM fine-tuning, pad batches.

Two layouts are understood:

* prompt + completion columns: the model sees ``prompt + completion + eos`` and is trained only on the
  completion and the eos (prompt labels are -100);
* a text column: the model is trained on every token of ``text + eos``.

Labels are aligned with ``input_ids`` (``labels[i] == input_ids[i]`` where supervised): HF causal LMs shift
them internally, so position 0 is never a target.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
from typing import Any

import torch

from .errors import ConfigError

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
# Texts are cut to this many characters per kept token before tokenising (a 40 MB row otherwise costs ~40 s
# and GBs per rank); _tokenize_capped widens the cut wherever it leaves too few tokens, so results are exact.
CHARS_PER_TOKEN = 32
HEAD_ROWS, HEAD_BYTES = 100, 4 << 20  # what precheck_data reads of each file


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
    _check_sizes(max_length, max_train_samples, max_eval_samples, validation_split)
    raw = _load_raw(dataset_name, dataset_config, train_file, validation_file)
    train, validation = raw["train"], raw.get("validation")
    if validation_split is not None:
        if validation is not None:
            raise ValueError(f"validation_split={validation_split} but the data already has a validation set: "
                             "unset validation_split (or validation_file)")
        parts = train.train_test_split(test_size=validation_split, seed=seed)
        train, validation = parts["train"], parts["test"]

    # The training columns pick the layout; a validation set must have the same columns.
    columns = _layout(train.column_names, text_column, prompt_column, completion_column, "train dataset")
    missing = [c for c in columns if validation is not None and c not in validation.column_names]
    if missing:
        raise ValueError(f"validation dataset has no column {missing[0]!r} (columns: {validation.column_names}): "
                         "give it the training data's columns")
    _check_rows(train, columns, "train_file", train_file)
    if validation is not None and validation_split is None:
        _check_rows(validation, columns, "validation_file", validation_file)
    tokenize = _make_tokenize(tokenizer, columns, max_length)
    out = {"train": _prepare(train, tokenize, max_train_samples, seed),
           "validation": None if validation is None else _prepare(validation, tokenize, max_eval_samples, seed)}
    if len(out["train"]) == 0:
        raise ValueError("no training example has a supervised token left: check max_length and the columns")
    return out


def _load_raw(dataset_name, dataset_config, train_file, validation_file) -> dict:
    import datasets

    builder = _check_sources(dataset_name, train_file, validation_file)
    if dataset_name:
        loaded = datasets.load_dataset(dataset_name, dataset_config)
        if "train" not in loaded:
            raise ValueError(f"dataset {dataset_name!r} has no 'train' split (splits: {list(loaded)}): "
                             "set train_file to local data instead")
        # Hub datasets name their held-out split either way; prefer "validation".
        held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
        return {"train": loaded["train"], "validation": held_out}

    def load(key, path):
        try:  # one load per file: loaded together, files must share a schema (a mismatch is an opaque cast error)
            return datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # datasets' errors name no file or line: find the bad one ourselves
            _scan_file(key, path, limit=None)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{key}={path!r} could not be loaded: {first}") from e
    return {"train": load("train_file", train_file),
            "validation": load("validation_file", validation_file) if validation_file else None}


def _check_sizes(max_length, max_train_samples, max_eval_samples, validation_split) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        # one token of context and one target at the least
        raise ConfigError(f"max_length must be an integer >= 2 (tokens per example), got {max_length!r}")
    for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 or None, got {value}")
    if validation_split is not None and not (0 < validation_split < 1 or
                                             (isinstance(validation_split, int) and validation_split >= 1)):
        raise ConfigError(f"validation_split must be a fraction in (0, 1) or a count >= 1, got {validation_split}")


def _check_sources(dataset_name, train_file, validation_file) -> str | None:
    """The data source settings; for local files, their builder ("json", "csv", "text")."""
    if dataset_name and train_file:
        raise ConfigError("both dataset_name and train_file are set: use one source")
    if dataset_name:
        if validation_file:
            raise ConfigError("validation_file is only used with train_file: unset it or use train_file")
        return None
    if not train_file:
        if validation_file:
            raise ConfigError("validation_file is set but train_file is not: set train_file too")
        raise ConfigError("no training data: set dataset_name (a hub dataset) or train_file (local json/jsonl/csv/txt)")
    builder = None
    for key, path in (("train_file", train_file), ("validation_file", validation_file)):
        if path is None:
            continue
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise ConfigError(f"{key}={path!r} has an unsupported extension: use .json, .jsonl, .csv or .txt")
        if os.path.isdir(path):
            raise ConfigError(f"{key}={path!r} is a folder: pass a file (.json, .jsonl, .csv or .txt)")
        if not os.path.isfile(path):
            raise ConfigError(f"{key}={path!r} does not exist")
        if builder not in (None, _BUILDERS[ext]):
            raise ConfigError(f"validation_file={path!r} is not in train_file's format: use the same kind of file")
        builder = _BUILDERS[ext]
    return builder


def precheck_data(run) -> None:
    """What can be checked cheaply before any process group: sizes, the source settings, and that each local
    file exists, is readable UTF-8 and that its first rows parse and have the fields. The full files are
    checked when loaded (build_datasets), with the same one-line messages."""
    _check_sizes(run.max_length, run.max_train_samples, run.max_eval_samples, run.validation_split)
    if _check_sources(run.dataset_name, run.train_file, run.validation_file) is None:
        return  # a hub dataset: nothing local to look at
    names = (run.text_column, run.prompt_column, run.completion_column)
    columns = None
    for key, path in (("train_file", run.train_file), ("validation_file", run.validation_file)):
        if path:
            columns = _scan_file(key, path, limit=HEAD_ROWS, names=names, columns=columns)


def _scan_file(key, path, *, limit, names=None, columns=None):
    """Read ``limit`` rows (None: all) of a local data file and raise a one-line ConfigError at the first bad
    byte, line or row. Returns the layout columns (chosen from the rows read, unless ``columns`` is given)."""
    where = f"{key}={path!r}"
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror}): check the path and its permissions") from None
    kind = _BUILDERS[os.path.splitext(path)[1].lower()]
    rows, seen, offset, decoder = [], 0, 0, codecs.getincrementaldecoder("utf-8")()
    with f:
        if kind == "json" and f.read(4096).lstrip()[:1] == b"[":  # one JSON list, not JSON lines
            f.seek(0)
            return _scan_json_array(where, f, names, columns)
        f.seek(0)
        for number, line in enumerate(f, start=1):
            try:
                text = decoder.decode(line)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where} is not UTF-8: byte {offset + e.start} (line {number}) cannot be decoded; "
                                  "re-encode the file as UTF-8") from None
            offset += len(line)
            if not text.strip():
                continue
            seen += 1
            if kind == "json":
                text = _json_line(where, number, text)
            if limit is not None:  # only the head is kept, for the field checks below
                rows.append((number, text))
                if seen >= limit or offset >= HEAD_BYTES:
                    break
    if not seen:
        raise ConfigError(f"{where} is empty: it needs at least one example")
    if kind == "text":
        return columns or ("text",)
    if not rows or (names is None and columns is None):  # a full scan, or nothing to compare the fields with
        return columns
    if kind == "csv":
        return columns or _layout(next(csv.reader(io.StringIO(rows[0][1]))), *names, where)
    if columns is None:
        columns = _layout(list(dict.fromkeys(k for _, row in rows for k in row)), *names, where)
    for number, row in rows:
        _check_fields(f"{where} line {number}", row, columns)
    return columns


def _json_line(where, number, text) -> dict:
    try:
        row = json.loads(text.rstrip())  # so that an error points into the line, not past its end
    except json.JSONDecodeError as e:
        msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # json's "Invalid control character at"
        raise ConfigError(f"{where} line {number}: invalid JSON ({msg} at column {e.colno}): each line must "
                          "be one JSON object") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where} line {number}: a JSON {type(row).__name__}, not an object: each line must be "
                          "one object such as {\"prompt\": ..., \"completion\": ...}")
    return row


def _scan_json_array(where, f, names, columns):
    try:
        data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8: byte {e.start} cannot be decoded; re-encode the file as UTF-8"
                          ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where} must hold JSON lines or a non-empty JSON list of objects")
    if names is not None or columns is not None:
        columns = columns or _layout(list(dict.fromkeys(k for r in data if isinstance(r, dict) for k in r)),
                                     *names, where)
        for i, row in enumerate(data[:HEAD_ROWS], start=1):
            _check_fields(f"{where} row {i}", row if isinstance(row, dict) else {}, columns)
    return columns


def _check_fields(where, row, columns) -> None:
    for column in columns:
        if row.get(column) is None:
            raise ConfigError(f"{where}: no {column!r} (fields: {sorted(row)}): every row needs "
                              f"{' and '.join(map(repr, columns))}")
        if not isinstance(row[column], str):
            raise ConfigError(f"{where}: {column!r} holds a {type(row[column]).__name__}, not text: write it as a "
                              "JSON string")


def _check_rows(ds, columns, key, path) -> None:
    """Every row of a freshly loaded dataset has text in ``columns``; names the first row that has not (1-based)
    or, for bytes that are not UTF-8 (pyarrow loads them and fails only when they are read), the byte offset."""
    import pyarrow as pa
    import pyarrow.compute as pc

    name = f"{key}={path!r}" if path else f"the {key.split('_')[0]} dataset"
    for column in columns:
        data = ds.data.column(column)
        if pa.types.is_string(data.type) or pa.types.is_large_string(data.type):
            try:
                data.validate(full=True)  # checks UTF-8, in C++
            except pa.ArrowInvalid:
                if path:
                    _scan_file(key, path, limit=None)
                raise ConfigError(f"{name}: column {column!r} holds bytes that are not UTF-8: re-encode the data"
                                  ) from None
            if data.null_count:
                row = pc.index(pc.is_null(data), True).as_py()
                raise ConfigError(f"{name} row {row + 1}: no {column!r} (missing or null): every row needs "
                                  f"{' and '.join(map(repr, columns))}")
            continue
        for row, value in enumerate(ds[column]):  # mixed or non-text column: rare, so a plain scan
            if not isinstance(value, str):
                raise ConfigError(f"{name} row {row + 1}: column {column!r} holds a {type(value).__name__}, not "
                                  "text: point the column setting at a string column")


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
    raise ConfigError(f"{split} has no column {missing!r} (columns: {list(columns)}): {fix}")


def _make_tokenize(tokenizer, columns, max_length):
    """A batched map function for the layout given by ``columns``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if len(columns) == 2:
        prompt_column, completion_column = columns

        def tokenize(batch):
            # Prompt and completion are tokenised apart and the ids concatenated, so the boundary is exact.
            # Special tokens (e.g. BOS) go before the prompt only. Truncation keeps a prompt's end.
            prompts = _tokenize_capped(tokenizer, _strings(batch[prompt_column], prompt_column), max_length,
                                       keep_end=True, add_special_tokens=True)
            completions = _tokenize_capped(tokenizer, _strings(batch[completion_column], completion_column),
                                           max_length, keep_end=False, add_special_tokens=False)
            return _assemble([(p, c + eos) for p, c in zip(prompts, completions)], max_length)
        return tokenize

    (text_column,) = columns

    def tokenize(batch):
        texts = _tokenize_capped(tokenizer, _strings(batch[text_column], text_column), max_length,
                                 keep_end=False, add_special_tokens=True)
        # A text is the completion of an empty prompt: every token is a target, the start survives truncation.
        return _assemble([([], t + eos) for t in texts], max_length)
    return tokenize


def _tokenize_capped(tokenizer, texts, max_length, *, keep_end, add_special_tokens):
    """Token ids of each text, exact in the part truncation keeps (at most max_length tokens at the start, or at
    the end for a prompt), without tokenising what it drops. A text is first cut to CHARS_PER_TOKEN characters per
    kept token; where the cut leaves fewer than 2 * max_length tokens (very long tokens), it is cut 4x wider
    until it does or is whole, so the tokens next to the cut are never among those kept."""
    def cut(text, chars):
        return text if len(text) <= chars else text[-chars:] if keep_end else text[:chars]

    chars = max_length * CHARS_PER_TOKEN
    ids = tokenizer([cut(t, chars) for t in texts], add_special_tokens=add_special_tokens)["input_ids"]
    for i, text in enumerate(texts):
        width = chars
        while len(text) > width and len(ids[i]) < 2 * max_length:
            width *= 4
            ids[i] = tokenizer(cut(text, width), add_special_tokens=add_special_tokens)["input_ids"]
    return ids


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
        if len(completion) < max_length:
            prompt = keep_prompt_end(prompt, len(completion), max_length)  # the completion survives
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


def keep_prompt_end(prompt: list, n_completion: int, max_length: int) -> list:
    """The prompt's last tokens that fit before ``n_completion`` tokens in ``max_length``: the one truncation
    rule of training and of ``ranking`` (which scores candidates exactly as they were trained)."""
    room = max_length - n_completion
    return prompt[len(prompt) - room:] if room < len(prompt) else prompt


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
