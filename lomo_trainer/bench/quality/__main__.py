"""Command line of the quality benchmark: ``python -m lomo_trainer.bench.quality [--steps N ...]``."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .runner import Settings, main


def parse(argv=None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m lomo_trainer.bench.quality", allow_abbrev=False,
                                description="Fine-tune SmolLM2-135M-Instruct with each optimizer on a docstring task "
                                            "from the Python stdlib; report held-out loss, multiple-choice accuracy, "
                                            "peak memory. See docs/quality.md.")
    for f in fields(Settings):
        if f.name in ("seeds", "variants"):
            p.add_argument(f"--{f.name}", nargs="+", type=int if f.name == "seeds" else str, default=None)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    ns = vars(p.parse_args(argv))
    for key in ("seeds", "variants"):
        ns[key] = tuple(ns[key]) if ns[key] is not None else getattr(Settings, key)
    return Settings(**ns)


if __name__ == "__main__":
    main(parse())
