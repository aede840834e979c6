"""Report: the results of a quality run as a markdown table (best lr, held-out metrics over seeds, memory, speed).

Per row: the lr grid with each lr's final dev loss (seed 0), the best lr, the test loss and multiple-choice
accuracy as mean ± half-range over the seeds run at the best lr (n given), the largest per-process peak
resident memory among those runs, and the steps each seed took to bring the dev loss to 0.9 x the zero-shot
dev loss (dev loss is measured every ``eval_every`` steps, so the count is a multiple of it; ">N" = never).
"""
from __future__ import annotations

import math
import os
from statistics import mean

from .variants import ORDER, VARIANTS


def _ms(values, digits):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    m = mean(values)
    half = (max(values) - min(values)) / 2
    return f"{m:.{digits}f} ± {half:.{digits}f} (n={len(values)})"


def steps_to(curve, target, steps):
    for step, loss in curve:
        if step > 0 and loss is not None and math.isfinite(loss) and loss <= target:
            return str(step)
    return f">{steps}"


def table(s, results: list[dict]) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    zero = next((r for r in ok if r["variant"] == "zero_shot"), None)
    lines = ["| row | lr: final dev loss (seed 0) | best lr | test loss | MC accuracy | peak RSS MiB "
             "| steps to 0.9 x zero-shot dev loss |", "|---|---|---|---|---|---|---|"]
    if zero:
        lines.append(f"| zero-shot | - | - | {zero['test_loss']:.3f} | {zero['mc_acc']:.3f} | {zero['peak_mib']:.0f} "
                     f"| (zero-shot dev loss {zero['dev_loss']:.3f}) |")
    target = 0.9 * zero["dev_loss"] if zero else None
    seed0 = s.seeds[0]
    for name in ORDER:
        v = VARIANTS[name]
        runs = [r for r in results if r["variant"] == name]
        if not runs:
            continue
        grid = []
        for lr in v.lrs:
            r = next((r for r in runs if r["lr"] == lr and r["seed"] == seed0), None)
            if r is None:
                grid.append(f"{lr:g}: not run")
            elif r.get("status") != "ok":
                grid.append(f"{lr:g}: failed")
            else:
                grid.append(f"{lr:g}: {r['dev_loss']:.3f}")
        sweep = [r for r in ok if r["variant"] == name and r["seed"] == seed0]
        if not sweep:
            lines.append(f"| {v.label} | {'; '.join(grid)} | - | - | - | - | - |")
            continue
        best = min(sweep, key=lambda r: r["dev_loss"] if math.isfinite(r["dev_loss"]) else math.inf)["lr"]
        seeds = [r for r in ok if r["variant"] == name and r["lr"] == best]
        reach = ", ".join(steps_to(r["dev_curve"], target, s.steps) for r in sorted(seeds, key=lambda r: r["seed"])) \
            if target else "-"
        partial = "" if len(v.lrs) == len(sweep) else " (sweep incomplete)"
        if not partial and best in (v.lrs[0], v.lrs[-1]):
            partial = " (grid edge)"
        lines.append(f"| {v.label} | {'; '.join(grid)} | {best:g}{partial} | {_ms([r['test_loss'] for r in seeds], 3)} "
                     f"| {_ms([r['mc_acc'] for r in seeds], 3)} | {max(r['peak_mib'] for r in seeds):.0f} | {reach} |")
    return "\n".join(lines)


def write(s, results: list[dict]) -> str:
    fps = {}
    for r in results:
        if r.get("fingerprint"):
            fps.setdefault(r["seed"], set()).add(r["fingerprint"])
    same = all(len(v) == 1 for v in fps.values())
    text = (table(s, results) + "\n\n"
            f"{s.steps} steps x batch {s.batch} per run; dev loss every {s.eval_every} steps on {s.dev_items} examples; "
            f"test: {s.test_items} examples, {s.mc_items} questions x {s.n_choices} choices; seeds {list(s.seeds)}. "
            f"Same token batches across rows for each seed: {'yes' if same else 'NO'}.\n")
    failed = [r for r in results if r.get("status") != "ok"]
    for r in failed:
        text += f"\nfailed: {r['variant']} lr={r['lr']} seed={r['seed']}: {r['status']}"
    path = os.path.join(s.out, "report.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    return path
