"""Evaluation of a causal LM on a SuperGLUE task by candidate ranking, under a protocol (``protocols.py``).

``evaluate`` builds the protocol's prompt instances, tokenises every candidate as the protocol trains it,
scores them with ``ranking.score_pairs`` (distributed when torch.distributed is initialised: call it on every
rank with the same examples), picks the best one per instance and computes the metrics:

- ``standard``: BoolQ, COPA, RTE, WiC, WSC ``accuracy``; CB ``accuracy`` and ``f1`` (3-class mean);
  MultiRC ``f1a`` over options and ``em`` per question; ReCoRD ``f1``/``em`` of the chosen entity against
  the gold answers (max over golds);
- ``paper``: ``accuracy`` on every task (MultiRC: per answer option; ReCoRD: the gold entity chosen).

``score`` is the mean of a task's metrics (the SuperGLUE leaderboard convention).
"""
from __future__ import annotations

from ..ranking import NORMALIZATIONS, _default_max_length, pick, score_pairs
from . import metrics
from .protocols import check_tasks, get_protocol
from .tasks import get_task

PAPER_METRICS = ("accuracy",)


def predict(model, tokenizer, task: str, examples: list[dict], normalize: str = "sum", *, protocol: str = "standard",
            batch_size: int = 8, max_length: int | None = None, device=None):
    """Per example, the chosen candidate index of each of its instances, and those instances."""
    proto = get_protocol(protocol)
    if normalize not in NORMALIZATIONS or (proto.accuracy_only and normalize != "sum"):
        raise ValueError(f"normalize={normalize!r} is not available under the {proto.name} protocol; use "
                         f"{'sum' if proto.accuracy_only else ' / '.join(NORMALIZATIONS)}.")
    name = get_task(task).name
    check_tasks(proto, [name])
    max_length = max_length or proto.max_length or _default_max_length(model)
    per_example = [proto.instances(name, ex) for ex in examples]
    flat = [inst for insts in per_example for inst in insts]
    pairs = [proto.encode(tokenizer, i.context, c, max_length) for i in flat for c in i.candidates]
    logprob = score_pairs(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device)
    choices, k = [], 0
    for inst in flat:
        n = len(inst.candidates)
        scores = [(logprob[k + j], len(pairs[k + j][1])) for j in range(n)]
        choices.append(pick(scores, normalize, inst.candidates) if n else None)
        k += n
    out, k = [], 0
    for insts in per_example:
        out.append(choices[k:k + len(insts)])
        k += len(insts)
    return out, per_example


def evaluate(model, tokenizer, task: str, examples: list[dict], normalize: str = "sum", *, protocol: str = "standard",
             batch_size: int = 8, max_length: int | None = None, device=None, return_predictions: bool = False) -> dict:
    """Metrics of ``model`` on labelled normalised ``examples``; see the module docstring. ``max_length``:
    the training one (default: the protocol's, else the model's)."""
    t, proto = get_task(task), get_protocol(protocol)
    if not examples:
        raise ValueError(f"no {t.dirname} examples to evaluate; check the split and the subsample size.")
    choices, per_example = predict(model, tokenizer, t.name, examples, normalize, protocol=protocol, batch_size=batch_size,
                                   max_length=max_length, device=device)
    golds = [[inst.gold for inst in insts] for insts in per_example]
    if proto.accuracy_only:
        _require_labels(t, golds)
        result = {"accuracy": metrics.accuracy([c for cs in choices for c in cs], [g for gs in golds for g in gs])}
    elif t.name == "record":
        preds = [ex["entities"][c[0]] if c[0] is not None else "" for ex, c in zip(examples, choices)]
        result = metrics.record_scores(preds, [ex["answers"] for ex in examples])
    elif t.name == "multirc":
        _require_labels(t, golds)
        result = metrics.multirc_scores(choices, golds)
    else:
        preds, golds = [c[0] for c in choices], [g[0] for g in golds]
        _require_labels(t, [golds])
        result = {"accuracy": metrics.accuracy(preds, golds)}
        if t.name == "cb":
            result["f1"] = metrics.macro_f1(preds, golds, num_classes=3)
    result = {k: result[k] for k in (PAPER_METRICS if proto.accuracy_only else t.metrics)}
    result.update(score=sum(result.values()) / len(result), n=len(examples), normalize=normalize)
    if return_predictions:
        result["predictions"] = preds if t.name == "record" and not proto.accuracy_only else choices
    return result


def task_metrics(task: str, protocol: str) -> tuple[str, ...]:
    return PAPER_METRICS if get_protocol(protocol).accuracy_only else get_task(task).metrics


def _require_labels(task, gold_groups):
    if any(g is None for group in gold_groups for g in group):
        raise ValueError(f"{task.dirname}: some examples have no label; evaluate a labelled split (train or validation).")
