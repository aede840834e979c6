"""The planner's tables in README.md and docs/, generated from the planner so that no figure can drift.

A table lives in a Markdown file between ``<!-- planner-table NAME -->`` and ``<!-- /planner-table -->``; NAME is a
key of ``TABLES``. Each table is a list of row groups that share the planner's flags and a list of columns, and is
written with the loops of ``python -m lomo_trainer.planner`` commands that print its figures: every cell is computed
from exactly the command quoted under it (``planner.parse_args``).

    python -m lomo_trainer.bench.doc_tables            # exit 1 and name each table that differs from the planner
    python -m lomo_trainer.bench.doc_tables --write    # rewrite them in place

``tests/test_docs.py`` runs the check, so a planner change that moves a figure fails until the docs are rewritten.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..clip_choice import MARGIN, choose
from .planner import breakdown, clip_figures, gib, parse_args

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- planner-table (\S+) -->\n)(.*?)(<!-- /planner-table -->)", re.S)


@dataclass(frozen=True)
class Group:
    """Rows that share the planner's flags: (label, --model) pairs."""
    models: tuple[tuple[str, str], ...]
    flags: str


@dataclass(frozen=True)
class Column:
    """One figure of each row. ``show``: "peak" (``mode``'s planned peak with overhead), "state" (AdaLomo's state),
    or clip_mode "auto"'s "choice", "two_pass", "buffered" and "buffer". ``flags`` are added to the group's."""
    title: str
    show: str = "peak"
    mode: str = "lomo"
    flags: str = ""


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    groups: tuple[Group, ...]


def _gib(n_bytes: float) -> str:
    return f"{gib(n_bytes):.1f} GiB"


@lru_cache(maxsize=None)
def _planned(argv: tuple[str, ...]):
    """The inventory and setup of one planner command line: built once, whatever the number of columns reading it."""
    _, inv, setup, _ = parse_args(list(argv))
    return inv, setup


def cell(column: Column, argv: list[str]) -> str:
    inv, setup = _planned(tuple(argv))
    if column.show == "peak":
        t = breakdown(inv, setup, column.mode)
        return _gib(t["total_with_overhead"]) + ("" if t["fits"] else ", does not fit")
    if column.show == "state":
        return f"{gib(breakdown(inv, setup, 'adalomo')['optimizer_states']) * 1024:.1f} MiB"
    f = clip_figures(inv, setup, "lomo")
    if column.show == "choice":
        return "buffered" if choose(f).clip_mode == "buffered" else "two-pass"
    if column.show == "buffered":
        fits = f.buffered_peak <= (1 - MARGIN) * f.gpu_mem_bytes
        return _gib(f.buffered_peak) + ("" if fits else f", over {1 - MARGIN:.0%}")
    return {"two_pass": _gib(f.two_pass_peak), "buffer": f"{gib(f.buffer_bytes):.2f} GiB"}[column.show]


def render(table: Table) -> str:
    lines = ["| model | " + " | ".join(c.title for c in table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    for group in table.groups:
        for label, model in group.models:
            cells = [cell(c, ["--model", model, *shlex.split(group.flags), *shlex.split(c.flags)])
                     for c in table.columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *commands(table)]
    return "\n".join(lines) + "\n"


def commands(table: Table) -> list[str]:
    """The planner commands that print the table's figures: the flags every row shares in ``$P``, then one line
    (a loop over the models) per group and distinct column flags."""
    runs = [(group, extra) for group in table.groups for extra in dict.fromkeys(c.flags for c in table.columns)]
    words = [shlex.split(f"{g.flags} {extra}") for g, extra in runs]
    n = 0
    while all(len(w) > n and w[n] == words[0][n] for w in words):
        n += 1
    if n and words[0][n - 1].startswith("--") and any(len(w) > n and not w[n].startswith("--") for w in words):
        n -= 1  # never split a flag from its value
    lines = [f'    P="python -m lomo_trainer.planner {" ".join(words[0][:n])}"']
    for (group, extra), w in zip(runs, words):
        clip = any(c.show not in ("peak", "state") for c in table.columns if c.flags == extra)
        rest = " ".join(w[n:] + ["--clip-auto"] * clip)
        if len(group.models) == 1:
            lines.append(f"    $P --model {group.models[0][1]} {rest}")
        else:
            names = " ".join(model for _, model in group.models)
            lines.append(f"    for m in {names}; do $P --model $m {rest}; done")
    return lines


_GPUS8 = "--gpus 8 --gpu-mem-gb 24 --seq-len 512 --batch 2 --activation-checkpointing"
_GPU1 = "--gpus 1 --gpu-mem-gb 24 --seq-len 512 --batch 2 --activation-checkpointing --dtype bf16"
_LLAMA = (("LLaMA-7B", "7b"), ("LLaMA-13B", "13b"), ("LLaMA-30B", "30b"))
_CURRENT = (("Llama-3.1-8B", "llama-3.1-8b"), ("Qwen3-8B", "qwen3-8b"), ("Qwen3-30B-A3B (MoE)", "qwen3-30b-a3b"))
_8X24 = (Group(_LLAMA, f"{_GPUS8} --dtype fp16 --ds-config configs/zero3_fp16.json"),
         Group((("LLaMA-65B", "65b"),), f"{_GPUS8} --dtype fp16 --ds-config configs/zero3_fp16_lowmem.json"),
         Group(_CURRENT, f"{_GPUS8} --dtype bf16 --ds-config configs/zero3_bf16.json"))

TABLES: dict[str, Table] = {
    # README: what a user plans with, LOMO against the stock Trainer's ZeRO-3 AdamW
    "8x24": Table((Column("LOMO"), Column("AdaLomo", mode="adalomo"), Column("ZeRO-3 AdamW (stock)", mode="adamw")),
                  _8X24),
    "1x24": Table((Column("LOMO"), Column("AdaLomo", mode="adalomo"), Column("ZeRO-3 AdamW (stock)", mode="adamw")),
                  (Group((("TinyLlama-1.1B", "1b"), ("LLaMA-7B", "7b"), ("Llama-3.1-8B", "llama-3.1-8b"),
                          ("Qwen3-8B", "qwen3-8b")), f"{_GPU1} --ds-config configs/zero3_bf16.json"),
                   Group((("LLaMA-13B, shards in CPU RAM", "13b"),
                          ("Qwen3-30B-A3B (MoE), shards in CPU RAM", "qwen3-30b-a3b")),
                         f"{_GPU1} --ds-config configs/zero3_bf16_offload.json --offload-param"))),
    # docs/memory.md: every optimizer the planner knows
    "8x24-all": Table((Column("LOMO"), Column("AdaLomo", mode="adalomo"), Column("AdaLomo state", show="state"),
                       Column("ZeRO-3 SGD", mode="sgd"), Column("ZeRO-3 AdamW", mode="adamw")), _8X24),
    # docs/accumulation.md: the accumulation buffer, fp32 or in the training dtype
    "accumulation": Table((Column("LOMO"), Column("LOMO + fp32 buffer", mode="lomo_accum"),
                           Column("LOMO + 16-bit buffer", mode="lomo_accum", flags="--accum-dtype fp16")),
                          _8X24[:2]),
    # docs/accumulation.md: clip_mode "auto" (its buffer is in the training dtype)
    "clip-auto": Table((Column('"auto" takes', show="choice"), Column("two-pass peak", show="two_pass"),
                        Column("buffered peak", show="buffered"), Column("buffer", show="buffer")),
                       tuple(Group(g.models, f"{g.flags} --accum-dtype {'bf16' if 'bf16' in g.flags else 'fp16'}")
                             for g in _8X24)),
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def refresh(text: str) -> tuple[str, list[str]]:
    """``text`` with every table block regenerated, and the names of the blocks that changed."""
    changed = []

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"planner-table {name!r} is not in lomo_trainer/bench/doc_tables.py TABLES")
        new = render(TABLES[name])
        if m.group(3) != new:
            changed.append(name)
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(fill, text), changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lomo_trainer.bench.doc_tables", description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the tables that differ, in place")
    args = ap.parse_args(argv)
    stale = []
    for path in doc_files():
        text = path.read_text()
        new, changed = refresh(text)
        if changed and args.write:
            path.write_text(new)
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
    verb = "rewritten" if args.write else "differ from the planner (python -m lomo_trainer.bench.doc_tables --write)"
    for line in stale:
        print(f"{line}: {verb}")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
