"""Results as JSON, a markdown table, and optionally a wandb run.

A results file holds one run: ``{"name", "model", "method", "split", "normalize", "n", "seed",
"tasks": {task: {metric: value, ..., "score", "n"}}}`` with metrics in [0, 1]. The table has one row per
run and one column per task (metrics x 100, joined by "/" where a task has two, e.g. CB acc/F1), plus the
mean task score over the tasks the run has.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tasks import TASKS, get_task

SHORT = {"accuracy": "acc", "f1": "F1", "f1a": "F1a", "em": "EM"}


def save_json(results: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def load_json(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read results file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: missing key 'tasks'; expected a results file written by `zero-shot`.")
    return data


def render_table(runs: list[dict]) -> str:
    present = {get_task(k).name for run in runs for k in run["tasks"]}
    tasks = [t for t in TASKS.values() if t.name in present]
    tasks.sort(key=lambda t: t.dirname.lower())
    header = ["Run"] + [f"{t.dirname} ({'/'.join(SHORT[m] for m in t.metrics)})" for t in tasks] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for run in runs:
        by_task = {get_task(k).name: v for k, v in run["tasks"].items()}
        cells = []
        for t in tasks:
            r = by_task.get(t.name)
            cells.append("/".join(f"{100 * r[m]:.1f}" for m in t.metrics) if r else "–")
        scores = [by_task[t.name]["score"] for t in tasks if t.name in by_task]
        cells.append(f"{100 * sum(scores) / len(scores):.1f}" if scores else "–")
        lines.append("| " + " | ".join([run_name(run)] + cells) + " |")
    return "\n".join(lines) + "\n"


def run_name(run: dict) -> str:
    return run.get("name") or os.path.basename(str(run.get("model", "run")).rstrip("/")) or "run"


def log_wandb(results: dict, project: str | None = None, table_md: str | None = None) -> None:
    """One wandb run per results dict; ``WANDB_MODE=offline`` works (nothing leaves the machine)."""
    import wandb

    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "lomo-superglue"), name=run_name(results),
                     config={k: v for k, v in results.items() if k != "tasks"})
    try:
        summary = {f"superglue/{task}/{k}": v for task, r in results["tasks"].items()
                   for k, v in r.items() if isinstance(v, (int, float))}
        run.log(summary)
        run.summary.update(summary)
        cols = ["task"] + sorted({k for r in results["tasks"].values() for k in r if k != "normalize"})
        run.log({"superglue/results": wandb.Table(columns=cols, data=[[t] + [r.get(c) for c in cols[1:]]
                                                                     for t, r in results["tasks"].items()])})
        if table_md:
            run.summary["superglue/table_md"] = table_md
    finally:
        run.finish()
