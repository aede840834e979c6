"""Data builder: a docstring task made from the Python standard library's own source, deterministic and split.

Every public function and method in the stdlib's ``.py`` files that has a docstring gives one item: its
qualified name (``json.dumps``, ``textwrap.TextWrapper.wrap``) and the first sentence of its docstring. The
source is read with ``ast``; no module is imported, so nothing runs. The text is the CPython team's, not ours,
and ships with every Python.

Training and held-out examples are prompt/completion pairs:

    prompt      'Python docstring of json.dumps:'
    completion  ' Serialize ``obj`` to a JSON formatted ``str``.'

The multiple-choice task: for a held-out prompt, the true first sentence against ``n_choices - 1`` others
drawn from the same held-out split, chosen among those closest in character length (so that the summed
log-likelihood, which favours short candidates, does not give the answer away), in a seeded random order.

Splits are by module file (a seeded hash of the module's name), so no held-out function shares a module with
a trained one; a held-out item whose sentence also occurs in train is dropped. The result depends only on the
stdlib folder's files (i.e. the Python version) and the seed.
"""
from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass

# Folders whose files are tests, demos, tools or duplicated vendored code, not the library's documented API.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "idlelib", "turtledemo",
             "ensurepip", "__pycache__", "tkinter", "pydoc_data", "venv", "msilib", "config-3"}
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Item:
    module: str        # the module whose file defines it ("xml.dom.minidom"): the unit of the split
    name: str          # qualified name: "os.path.join"
    summary: str       # first sentence of the docstring

    @property
    def prompt(self) -> str:
        return f"Python docstring of {self.name}:"

    @property
    def completion(self) -> str:
        return " " + self.summary


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def first_sentence(doc: str, max_chars: int = 120) -> str | None:
    """The docstring's first paragraph up to its first full stop, on one line; None if unusable."""
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    m = re.search(r"\.(\s|$)", text)
    if m:
        text = text[:m.start() + 1]
    if not (20 <= len(text) <= max_chars) or not text[0].isalpha():
        return None
    if ">>>" in text or text.lower().startswith(("deprecated", "see ", "same as", "alias", "undocumented")):
        return None
    return text


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _items_of_file(root: str, path: str) -> list[Item]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    module = _module_name(root, path)
    if any(part.startswith("_") for part in module.split(".")):
        return []
    out = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                name = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                summary = first_sentence(doc) if doc else None
                if summary:
                    out.append(Item(module, name, summary))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name)

    visit(tree.body, module)
    return out


def collect(root: str | None = None) -> list[Item]:
    """Every usable item under the stdlib folder (or ``root``), sorted by name, one per name and per sentence."""
    root = root or stdlib_dir()
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                items.extend(_items_of_file(root, os.path.join(dirpath, fn)))
    items.sort(key=lambda it: (it.name, it.summary))
    seen_names, seen_text, unique = set(), set(), []
    for it in items:  # aliases (posixpath/ntpath, the same method on many classes) would leak across splits
        if it.name in seen_names or it.summary in seen_text:
            continue
        seen_names.add(it.name)
        seen_text.add(it.summary)
        unique.append(it)
    return unique


def split_of(module: str, seed: int, held_out: float) -> str:
    """"train", "dev" or "test" for a module: a seeded hash, stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "big") / 2 ** 64
    if h < held_out:
        return "dev"
    if h < 2 * held_out:
        return "test"
    return "train"


def build(seed: int = 0, held_out: float = 0.15, root: str | None = None) -> dict[str, list[Item]]:
    """Items by split, each list in a seeded random order (train is then read front to back)."""
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for it in collect(root):
        splits[split_of(it.module, seed, held_out)].append(it)
    train_text = {it.summary for it in splits["train"]}
    for s in ("dev", "test"):
        splits[s] = [it for it in splits[s] if it.summary not in train_text]
    rng = random.Random(seed)
    for s in SPLITS:
        rng.shuffle(splits[s])
    return splits


def multiple_choice(items: list[Item], n_choices: int = 4, seed: int = 0, pool: int = 8):
    """(context, candidates, answer index) per item: the true sentence and ``n_choices - 1`` distractors drawn
    from the ``pool`` items nearest in length (excluding itself), shuffled with a seeded RNG."""
    if len(items) < n_choices:
        raise ValueError(f"multiple_choice needs at least {n_choices} items, got {len(items)}")
    rng = random.Random(seed)
    by_len = sorted(range(len(items)), key=lambda i: (len(items[i].summary), i))
    rank = {i: r for r, i in enumerate(by_len)}
    out = []
    for i, it in enumerate(items):
        r = rank[i]
        lo = max(0, min(r - pool // 2, len(by_len) - pool - 1))
        near = [j for j in by_len[lo:lo + pool + 1] if j != i][:pool]
        others = rng.sample(near, n_choices - 1)
        cands = [it.completion] + [items[j].completion for j in others]
        order = list(range(n_choices))
        rng.shuffle(order)
        out.append((it.prompt, [cands[k] for k in order], order.index(0)))
    return out
