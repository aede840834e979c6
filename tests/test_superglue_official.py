"""Our SuperGLUE metrics against hand transcriptions of the official scorers, on random and edge cases.

Sources (transcribed by hand below; the originals are not vendored):
- ReCoRD: "Official evaluation script for ReCoRD v1.0" (record_evaluation.py, shipped with ReCoRD and used by
  SuperGLUE): normalize_answer, f1_score, exact_match_score, metric_max_over_ground_truths, evaluate.
- CB F1: jiant's CommitmentBank metric (mean over labels 0, 1, 2 of sklearn f1_score(labels == k, preds == k))
  and T5's mean_multiclass_f1(num_classes=3), i.e. sklearn fbeta_score(beta=1, labels=range(3),
  average="macro"); sklearn's ill-defined precision/recall/F count as 0 (zero_division default).
- MultiRC: T5's multirc_f1_over_all_answers (sklearn f1_score over every answer option, binary) and its EM,
  mean_group_metric(all_match) over question groups.
- Accuracy: sklearn accuracy_score (T5's accuracy, jiant's simple_accuracy).
"""
import random
import re
import string
from collections import Counter

import pytest

from lomo_trainer.superglue.metrics import accuracy, binary_f1, macro_f1, multirc_scores, record_scores

# ---- record_evaluation.py (ReCoRD v1.0), transcribed ----


def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def official_record(predictions, gold_lists):
    f1 = em = 0
    for prediction, ground_truths in zip(predictions, gold_lists):
        em += official_metric_max_over_ground_truths(official_exact_match_score, prediction, ground_truths)
        f1 += official_metric_max_over_ground_truths(official_f1_score, prediction, ground_truths)
    return {"em": em / len(gold_lists), "f1": f1 / len(gold_lists)}


# ---- sklearn's definitions as jiant and T5 call them, transcribed ----


def sk_binary_f1(y_true, y_pred):
    tp = sum(t and p for t, p in zip(y_true, y_pred))
    fp = sum(p and not t for t, p in zip(y_true, y_pred))
    fn = sum(t and not p for t, p in zip(y_true, y_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def jiant_cb_f1(labels, preds):
    return sum(sk_binary_f1([y == k for y in labels], [p == k for p in preds]) for k in range(3)) / 3


def t5_multirc(golds, preds):
    flat_g = [x == 1 for g in golds for x in g]
    flat_p = [x == 1 for p in preds for x in p]
    em = sum(all(a == b for a, b in zip(g, p)) for g, p in zip(golds, preds)) / len(golds)
    return {"f1a": sk_binary_f1(flat_g, flat_p), "em": em}


# ---- cases ----

WORDS = ["the", "a", "An", "Quarn", "city", "City", "FC", "Pell's", "-", "", " ", ".", "Tam", "rovers", "an", "x"]


def random_answer(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4))) + rng.choice(["", "!", ",", "  "])


EDGE_RECORD = [("", [""]), ("the", [""]), ("", ["a"]), ("The", ["an"]), ("!!", ["..."]), ("", ["Quarn"]),
               ("Quarn", ["the"]), ("Quarn", ["", "Quarn"]), ("the the", ["a the"]), ("city city", ["city"])]


@pytest.mark.parametrize("pred,golds", EDGE_RECORD)
def test_record_edge_cases_match_the_official_script(pred, golds):
    assert record_scores([pred], [golds]) == pytest.approx(official_record([pred], [golds]))


def test_record_empty_normalisation_is_f1_zero_em_one():
    # both sides normalise to nothing: the official script gives F1 0 (no shared token) and EM 1
    assert record_scores(["the"], [[""]]) == {"f1": 0.0, "em": 1.0}


def test_record_random_cases_match_the_official_script():
    rng = random.Random(12)
    for _ in range(300):
        n = rng.randint(1, 5)
        preds = [random_answer(rng) for _ in range(n)]
        golds = [[random_answer(rng) for _ in range(rng.randint(1, 3))] for _ in range(n)]
        assert record_scores(preds, golds) == pytest.approx(official_record(preds, golds)), (preds, golds)


EDGE_CB = [([0], [0]), ([2, 2], [2, 2]), ([0, 1], [0, 0]), ([1, 1, 1], [0, 0, 0]), ([0, 1, 2], [2, 1, 0]),
           ([0, 1, 2], [0, 1, 2])]


@pytest.mark.parametrize("preds,golds", EDGE_CB)
def test_cb_f1_edge_cases_match_jiant_and_t5(preds, golds):
    assert macro_f1(preds, golds, num_classes=3) == pytest.approx(jiant_cb_f1(golds, preds))


def test_cb_f1_absent_class_scores_zero():
    assert macro_f1([0], [0], num_classes=3) == pytest.approx(1 / 3)  # the official value, not 1.0


def test_cb_f1_and_accuracy_random_cases_match():
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(1, 12)
        k = rng.choice([1, 2, 3])  # subsamples that lack classes are the point
        preds, golds = [rng.randrange(k) for _ in range(n)], [rng.randrange(k) for _ in range(n)]
        rng.shuffle(preds)
        assert macro_f1(preds, golds, 3) == pytest.approx(jiant_cb_f1(golds, preds)), (preds, golds)
        assert accuracy(preds, golds) == pytest.approx(sum(p == g for p, g in zip(preds, golds)) / n)


def test_multirc_random_and_edge_cases_match_t5():
    rng = random.Random(5)
    cases = [([[0, 0]], [[0, 0]]), ([[1]], [[0]]), ([[0]], [[1]]), ([[1, 1]], [[1, 1]])]
    for _ in range(300):
        groups = [rng.randint(1, 4) for _ in range(rng.randint(1, 5))]
        p = rng.random()
        cases.append(([[int(rng.random() < p) for _ in range(g)] for g in groups],
                       [[rng.randint(0, 1) for _ in range(g)] for g in groups]))
    for preds, golds in cases:
        assert multirc_scores(preds, golds) == pytest.approx(t5_multirc(golds, preds)), (preds, golds)
        flat_p = [x for g in preds for x in g]
        flat_g = [x for g in golds for x in g]
        assert binary_f1(flat_p, flat_g) == pytest.approx(sk_binary_f1([x == 1 for x in flat_g], [x == 1 for x in flat_p]))


def test_macro_f1_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="not a class index"):
        macro_f1([3], [0], num_classes=3)
