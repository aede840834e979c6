"""Results as JSON, a markdown table, and optionally a wandb run.

A results file holds one run: ``{"name", "model", "method", "protocol", "split", "normalize", "n", "seed",
"tasks": {task: {metric: value, ..., "score", "n", "selected", "best", "last", "epochs"}}}`` with metrics in
[0, 1]; a task's top-level metrics are its ``selected`` evaluation (the protocol's headline: best or last
epoch). The table has one row per run and one column per task and protocol (metrics x 100, joined by "/"
where a task has two, e.g. CB acc/F1), plus the mean task score over the tasks the run has: a column never
mixes protocols (a file without "protocol" is "standard").
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


def protocol(run: dict) -> str:
    return run.get("protocol", "standard")


def render_table(runs: list[dict]) -> str:
    from .evaluation import task_metrics

    present = {(protocol(run), get_task(k).name) for run in runs for k in run["tasks"]}
    protocols = sorted({p for p, _ in present}, key=lambda p: p != "standard")
    cols = [(p, t) for p in protocols for t in sorted(TASKS.values(), key=lambda t: t.dirname.lower())
            if (p, t.name) in present]
    tag = len(protocols) > 1  # name the protocol in the header only where the table holds two
    header = ["Run"] + [f"{t.dirname}{' ' + p if tag else ''} ({'/'.join(SHORT[m] for m in task_metrics(t.name, p))})"
                        for p, t in cols] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for run in runs:
        by_task = {get_task(k).name: v for k, v in run["tasks"].items()}
        cells, scores = [], []
        for p, t in cols:
            r = by_task.get(t.name) if p == protocol(run) else None
            cells.append("/".join(f"{100 * r[m]:.1f}" for m in task_metrics(t.name, p)) if r else "–")
            scores += [r["score"]] if r else []
        cells.append(f"{100 * sum(scores) / len(scores):.1f}" if scores else "–")
        lines.append("| " + " | ".join([run_name(run)] + cells) + " |")
    return "\n".join(lines) + "\n"


def merge_runs(runs: list[dict]) -> list[dict]:
    """One row per run name and protocol where the files hold different tasks (one command per task); a file
    that repeats a task of its row starts a new row."""
    rows: list[dict] = []
    for run in runs:
        name, tasks = run_name(run), {get_task(t).name: m for t, m in run["tasks"].items()}
        row = next((r for r in rows if run_name(r) == name and protocol(r) == protocol(run)
                    and not set(tasks) & set(r["tasks"])), None)
        if row is None:
            rows.append({**run, "name": name, "tasks": tasks})
        else:
            row["tasks"].update(tasks)
    return rows


def write_results(results: dict, root, *, wandb: bool = False, wandb_project=None, show: bool = False,
                  log: bool = False) -> None:
    """results.json and results.md under ``root``; ``log``: a line per task, ``show``: the table."""
    table = render_table([results])
    save_json(results, Path(root) / "results.json")
    (Path(root) / "results.md").write_text(table)
    if log:
        for task, r in results["tasks"].items():
            print(f"{get_task(task).dirname} ({results['method']}, {protocol(results)}): "
                  + ", ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    if show:
        print(table)
    if wandb:
        log_wandb(results, wandb_project, table)


def run_name(run: dict) -> str:
    return run.get("name") or os.path.basename(str(run.get("model", "run")).rstrip("/")) or "run"


def log_wandb(results: dict, project: str | None = None, table_md: str | None = None) -> None:
    """One wandb run per results dict; ``WANDB_MODE=offline`` works (nothing leaves the machine)."""
    import wandb

    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "lomo-superglue"), name=run_name(results),
                     config={k: v for k, v in results.items() if k != "tasks"})
    try:
        summary = {f"superglue/{protocol(results)}/{task}/{k}": v for task, r in results["tasks"].items()
                   for k, v in r.items() if isinstance(v, (int, float))}
        run.log(summary)
        run.summary.update(summary)
        cols = ["task"] + sorted({k for r in results["tasks"].values() for k in r
                                  if isinstance(r[k], (int, float)) and not isinstance(r[k], bool)})
        run.log({"superglue/results": wandb.Table(columns=cols, data=[[t] + [r.get(c) for c in cols[1:]]
                                                                     for t, r in results["tasks"].items()])})
        if table_md:
            run.summary["superglue/table_md"] = table_md
    finally:
        run.finish()
