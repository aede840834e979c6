"""Load a SuperGLUE split from local JSONL files or from the hub, normalised (see ``schema``).

Local layout, as in the SuperGLUE release: ``<data_dir>/<Task>/{train,val,test}.jsonl`` with ``<Task>``
one of BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC. Hub: ``datasets.load_dataset("super_glue",
<config>)`` or any mirror with the same schema (``hub_repo="aps/super_glue"``, a parquet copy that needs no
loading script).

Subsampling draws ``n`` examples with ``random.Random(seed)`` and keeps them in file order. The unit is
the normalised example: a MultiRC question with all its answer options, a ReCoRD query.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .schema import from_hub, from_jsonl
from .tasks import get_task

SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "val": "val.jsonl", "test": "test.jsonl"}


def _split_key(split: str) -> str:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; use train, validation (or val) or test.")
    return "validation" if split == "val" else split


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}); one JSON object per line expected.") from None
    return rows


def load_local(task: str, split: str, data_dir) -> list[dict]:
    t = get_task(task)
    folder = Path(data_dir) / t.dirname
    path = folder / SPLIT_FILES[_split_key(split)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --data-dir must hold SuperGLUE's <Task>/{path.name} "
                                f"folders (e.g. {folder.name}/{path.name}).")
    return from_jsonl(t.name, read_jsonl(path), source=str(path))


def load_hub(task: str, split: str, hub_repo: str = "super_glue") -> list[dict]:
    import datasets

    t = get_task(task)
    config = t.hub_config
    rows = datasets.load_dataset(hub_repo, config, split=_split_key(split))
    return from_hub(t.name, rows, source=f"{hub_repo}/{config}:{split}")


def subsample(examples: list, n: int | None, seed: int = 0) -> list:
    """``n`` examples drawn with ``seed``, in their original order; all of them when n is None or too big."""
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}.")
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_task(task: str, split: str = "validation", data_dir=None, *, n: int | None = None, seed: int = 0,
              hub_repo: str = "super_glue") -> list[dict]:
    """Normalised examples of one split: from ``data_dir`` when given, else from the hub."""
    _split_key(split)
    examples = load_local(task, split, data_dir) if data_dir is not None else load_hub(task, split, hub_repo)
    return subsample(examples, n, seed)
