"""Scoring: held-out loss and multiple-choice accuracy, both through lomo_trainer.ranking's summed log-likelihood.

The held-out loss is the token mean of the negative log-likelihood of each example's completion (and its EOS)
given its prompt: exactly the tokens, and the mean, that training minimises. The multiple-choice accuracy ranks
each request's candidates by their summed log-likelihood (``ranking.pick(..., "sum")``), the way
``lomo_trainer.superglue`` scores its tasks; candidates are scored without EOS, as SuperGLUE's are.
"""
from __future__ import annotations

import math

from ...ranking import encode_pair, pick, score_candidates, score_pairs


def encode_examples(tokenizer, items, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per item: the sequences ``lomo_trainer.data`` would train on."""
    return [encode_pair(tokenizer, it.prompt, it.completion, max_length, add_eos=True) for it in items]


def train_features(pairs) -> list[dict]:
    """Training rows (input_ids, labels) from encoded pairs: the prompt's labels are -100."""
    return [{"input_ids": ctx + cont, "labels": [-100] * len(ctx) + cont} for ctx, cont in pairs]


def heldout_loss(model, pairs, *, pad_id=None, batch_size: int = 16) -> float:
    """Token-mean NLL (nats) of the completions of ``pairs`` under ``model``."""
    logp = score_pairs(model, pairs, pad_id=pad_id, batch_size=batch_size)
    n = sum(len(cont) for _, cont in pairs)
    return -math.fsum(logp) / n


def mc_accuracy(model, tokenizer, questions, *, max_length: int, batch_size: int = 16) -> float:
    """Fraction of ``(context, candidates, answer)`` questions whose answer has the highest summed
    log-likelihood (ties go to the first candidate)."""
    scores = score_candidates(model, tokenizer, [(q[0], q[1]) for q in questions], batch_size=batch_size,
                              max_length=max_length)
    right = sum(pick(s, "sum") == q[2] for s, q in zip(scores, questions))
    return right / len(questions)
