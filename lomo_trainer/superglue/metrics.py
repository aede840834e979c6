"""SuperGLUE metrics, written from their definitions (no sklearn, no `evaluate`).

- ``accuracy``: fraction of predictions equal to the gold label.
- ``macro_f1``: mean over the classes ``0 .. num_classes - 1`` of F1 = 2TP / (2TP + FP + FN), a class with no
  true positive scoring 0 -- also one absent from both golds and predictions. This is CB's F1 in the
  SuperGLUE baselines: jiant's CommitmentBank scheme (per-class binary F1, averaged over the 3 classes) and
  T5's ``mean_multiclass_f1(num_classes=3)`` (sklearn ``fbeta_score(labels=range(3), average="macro")``).
- ``binary_f1``: F1 of the positive class; 0.0 when there is no positive gold or predicted (sklearn's
  ``zero_division=0``). MultiRC's F1a is this over all answer options.
- ``multirc_em``: fraction of question groups whose answer options are all predicted right.
- ``squad_normalize``, ``token_f1``, ``exact_match``: SQuAD's answer normalisation (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace) and its token-overlap F1 / exact match.
  As in the official ReCoRD v1.0 script, F1 is 0 whenever no token is shared -- also when prediction and
  gold both normalise to nothing (their exact match is then 1).
- ``record_scores``: ReCoRD's F1 and EM, each the max over an example's gold answers, averaged.

Every function returns floats in [0, 1] and raises on empty input, which has no meaningful score.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence


def _check(preds, golds):
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels; pass one prediction per example.")
    if not golds:
        raise ValueError("no examples to score.")


def accuracy(preds: Sequence, golds: Sequence) -> float:
    _check(preds, golds)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def binary_f1(preds: Sequence, golds: Sequence, positive=1) -> float:
    _check(preds, golds)
    tp = sum(p == positive and g == positive for p, g in zip(preds, golds))
    fp = sum(p == positive and g != positive for p, g in zip(preds, golds))
    fn = sum(p != positive and g == positive for p, g in zip(preds, golds))
    return _f1(tp, fp, fn)


def macro_f1(preds: Sequence, golds: Sequence, num_classes: int) -> float:
    """Labels are class indices; every class counts, seen or not (a subsample may lack one)."""
    _check(preds, golds)
    bad = [x for x in (*preds, *golds) if not (isinstance(x, int) and 0 <= x < num_classes)]
    if bad:
        raise ValueError(f"label {bad[0]!r} is not a class index in 0..{num_classes - 1}.")
    return sum(binary_f1(preds, golds, positive=c) for c in range(num_classes)) / num_classes


def multirc_em(preds: Sequence[Sequence], golds: Sequence[Sequence]) -> float:
    """``preds``/``golds``: one list of 0/1 per question group."""
    _check(preds, golds)
    for p, g in zip(preds, golds):
        if len(p) != len(g):
            raise ValueError(f"a question group has {len(p)} predictions for {len(g)} answer options.")
    return sum(list(p) == list(g) for p, g in zip(preds, golds)) / len(golds)


def multirc_scores(preds: Sequence[Sequence], golds: Sequence[Sequence]) -> dict:
    em = multirc_em(preds, golds)  # first: it checks the groups line up
    flat_p = [x for group in preds for x in group]
    flat_g = [x for group in golds for x in group]
    return {"f1a": binary_f1(flat_p, flat_g), "em": em}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(pred: str, gold: str) -> float:
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, gold: str) -> float:
    return float(squad_normalize(pred) == squad_normalize(gold))


def record_scores(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """``preds``: one answer string per query; ``golds``: the gold answers of each query (at least one)."""
    _check(preds, golds)
    f1 = em = 0.0
    for i, (p, gs) in enumerate(zip(preds, golds)):
        if not gs:
            raise ValueError(f"ReCoRD query {i} has no gold answers; score only labelled splits.")
        f1 += max(token_f1(p, g) for g in gs)
        em += max(exact_match(p, g) for g in gs)
    return {"f1": f1 / len(golds), "em": em / len(golds)}
