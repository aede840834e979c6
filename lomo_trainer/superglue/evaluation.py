"""Zero-shot / post-fine-tuning evaluation of a causal LM on a SuperGLUE task by candidate ranking.

``evaluate`` builds the task's prompt instances, scores every candidate with ``ranking.score_candidates``
(distributed when torch.distributed is initialised: call it on every rank with the same examples), picks
the best one per instance and computes the task's metrics:

- BoolQ, COPA, RTE, WiC, WSC: ``accuracy``; CB: ``accuracy`` and macro ``f1``;
- MultiRC: each answer option ranked No/Yes; ``f1a`` over options, ``em`` per question;
- ReCoRD: the passage entities ranked as fillers of the query; ``f1``/``em`` of the chosen entity against
  the gold answers (max over golds).

``score`` is the mean of a task's metrics (the SuperGLUE leaderboard convention).
"""
from __future__ import annotations

from ..ranking import NORMALIZATIONS, pick, score_candidates
from . import metrics
from .tasks import get_task, instances


def predict(model, tokenizer, task: str, examples: list[dict], normalize: str = "sum", **score_kwargs):
    """Per example, the chosen candidate index of each of its instances, and those instances."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={normalize!r}; use one of {NORMALIZATIONS}.")
    name = get_task(task).name
    per_example = [instances(name, ex) for ex in examples]
    flat = [inst for insts in per_example for inst in insts]
    scores = score_candidates(model, tokenizer, [(i.context, i.candidates) for i in flat], **score_kwargs)
    choices = [pick(s, normalize, i.candidates) if i.candidates else None for s, i in zip(scores, flat)]
    out, k = [], 0
    for insts in per_example:
        out.append(choices[k:k + len(insts)])
        k += len(insts)
    return out, per_example


def evaluate(model, tokenizer, task: str, examples: list[dict], normalize: str = "sum", *, batch_size: int = 8,
             max_length: int | None = None, device=None, return_predictions: bool = False) -> dict:
    """Metrics of ``model`` on labelled normalised ``examples``; see the module docstring."""
    t = get_task(task)
    if not examples:
        raise ValueError(f"no {t.dirname} examples to evaluate; check the split and the subsample size.")
    # add_eos: candidates are scored as training records are trained (data.py appends EOS to completions)
    choices, per_example = predict(model, tokenizer, t.name, examples, normalize, add_eos=True,
                                   batch_size=batch_size, max_length=max_length, device=device)
    if t.name == "record":
        preds = [ex["entities"][c[0]] if c[0] is not None else "" for ex, c in zip(examples, choices)]
        result = metrics.record_scores(preds, [ex["answers"] for ex in examples])
    elif t.name == "multirc":
        golds = [[inst.gold for inst in insts] for insts in per_example]
        _require_labels(t, golds)
        result = metrics.multirc_scores(choices, golds)
    else:
        preds, golds = [c[0] for c in choices], [insts[0].gold for insts in per_example]
        _require_labels(t, [golds])
        result = {"accuracy": metrics.accuracy(preds, golds)}
        if t.name == "cb":
            result["f1"] = metrics.macro_f1(preds, golds, num_classes=3)
    result = {k: result[k] for k in t.metrics}
    result.update(score=sum(result.values()) / len(result), n=len(examples), normalize=normalize)
    if return_predictions:
        result["predictions"] = preds if t.name == "record" else choices
    return result


def _require_labels(task, gold_groups):
    if any(g is None for group in gold_groups for g in group):
        raise ValueError(f"{task.dirname}: some examples have no label; evaluate a labelled split (train or validation).")
