"""SuperGLUE metrics against values worked out by hand, and evaluate()'s wiring on a model with no preference."""
from pathlib import Path

import pytest
import torch
from torch import nn

from lomo_trainer.superglue import evaluate, load_task
from lomo_trainer.superglue.metrics import (accuracy, binary_f1, exact_match, macro_f1, multirc_scores,
                                            record_scores, squad_normalize, token_f1)
from lomo_trainer.superglue.report import render_table

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_cb_macro_f1():
    # class 0: TP 1 FP 1 FN 1 -> 1/2; class 1: TP 1 FP 1 FN 0 -> 2/3; class 2: TP 2 FP 0 FN 1 -> 4/5
    assert macro_f1([0, 1, 1, 2, 2, 0], [0, 0, 1, 2, 2, 2], 3) == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)
    # every class counts: one only predicted (1) and one in neither (2) both score 0 (official CB F1)
    assert macro_f1([0, 1], [0, 0], 3) == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert macro_f1([2, 2], [2, 2], 3) == pytest.approx(1 / 3)


def test_binary_f1_without_positives_is_zero():
    assert binary_f1([0, 0], [0, 0]) == 0.0
    assert binary_f1([1, 0, 0], [1, 1, 0]) == pytest.approx(2 / 3)  # TP 1, FN 1


def test_multirc_f1a_and_em():
    golds = [[1, 0, 1], [0, 1]]
    preds = [[1, 1, 1], [0, 1]]  # flat: TP 3, FP 1, FN 0 -> F1a 6/7; only the second group is all right
    assert multirc_scores(preds, golds) == pytest.approx({"f1a": 6 / 7, "em": 0.5})
    assert multirc_scores([[0, 0]], [[0, 0]]) == {"f1a": 0.0, "em": 1.0}
    with pytest.raises(ValueError, match="answer options"):
        multirc_scores([[1]], [[1, 0]])


def test_squad_normalisation():
    assert squad_normalize("  The Quarn-City, FC!  ") == "quarncity fc"
    assert squad_normalize("An apple a day") == "apple day"
    assert squad_normalize("theatre") == "theatre"  # articles only as whole words
    assert squad_normalize("Ida's") == "idas"


def test_token_f1_and_exact_match():
    assert token_f1("the Quarn City!", "Quarn  city") == 1.0
    assert exact_match("the Quarn City!", "Quarn  city") == 1.0
    assert token_f1("Quarn City Rovers", "Quarn City") == pytest.approx(0.8)  # P 2/3, R 1
    assert exact_match("Quarn City Rovers", "Quarn City") == 0.0
    assert token_f1("city city", "city") == pytest.approx(2 / 3)  # overlap counts each token once: P 1/2, R 1
    assert token_f1("Pell", "Tam") == 0.0


def test_empty_answers_official_record_convention():
    assert token_f1("", "Quarn") == 0.0
    assert token_f1("Quarn", "the") == 0.0  # the gold normalises to nothing
    assert token_f1("the", "") == 0.0 and exact_match("A", "the") == 1.0  # both empty: F1 0, EM 1 (ReCoRD v1.0)
    assert exact_match("", "Quarn") == 0.0


def test_record_max_over_golds():
    # query 1: F1 vs "Pell" = 2/3 (P 1/2, R 1), vs "Pell Rovers FC" = 0.8 (P 1, R 2/3): max 0.8; EM 0
    # query 2: empty prediction: 0; query 3: exact match with the second gold
    scores = record_scores(["Pell Rovers", "", "tam valley"], [["Pell", "Pell Rovers FC"], ["Tam"], ["Pell", "Tam Valley."]])
    assert scores == pytest.approx({"f1": (0.8 + 0 + 1) / 3, "em": 1 / 3})
    with pytest.raises(ValueError, match="no gold answers"):
        record_scores(["x"], [[]])


class Uniform(nn.Module):
    """Equal logits for every token: every candidate scores -n_tokens * log(V), so ties are everywhere."""

    def __init__(self, vocab=32):
        super().__init__()
        self.vocab, self.anchor = vocab, nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return (torch.zeros(*input_ids.shape, self.vocab) + self.anchor,)


def whitespace_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # one token per word: counts are easy to reason about
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def test_evaluate_ties_go_to_the_first_candidate():
    model, tok = Uniform(), whitespace_tokenizer()
    # CB golds [0, 1, 2, 0]; every candidate one token, all tie -> always 0 ("True" = entailment)
    cb = evaluate(model, tok, "cb", load_task("cb", "validation", FIXTURES))
    assert cb["accuracy"] == 0.5
    assert cb["f1"] == pytest.approx((4 / 6 + 0 + 0) / 3)  # class 0: TP 2 FP 2; classes 1, 2: F1 0
    assert cb["score"] == pytest.approx((0.5 + 2 / 9) / 2) and cb["n"] == 4
    # ReCoRD "sum": the fewest-token entity wins, the first of equals. Query 1: Brindle (1) ties Monday (1) ->
    # Brindle = gold. Query 2: Brindle again, gold Ida Holm. Query 3: May, gold Tam Valley Railway.
    rec = evaluate(model, tok, "record", load_task("record", "validation", FIXTURES), return_predictions=True)
    assert rec["predictions"] == ["Brindle", "Brindle", "May"]
    assert rec["f1"] == pytest.approx(1 / 3) and rec["em"] == pytest.approx(1 / 3)
    # per token every candidate ties: the first entity everywhere
    rec = evaluate(model, tok, "record", load_task("record", "validation", FIXTURES), "token", return_predictions=True)
    assert rec["predictions"] == ["Brindle", "Brindle", "Tam Valley Railway"]
    # MultiRC: " No" on every option; golds [1,0,1], [0,1], [1,0]: no true positive, every question has a yes
    assert evaluate(model, tok, "multirc", load_task("multirc", "validation", FIXTURES))["f1a"] == 0.0


def test_markdown_table():
    runs = [{"name": "zs", "tasks": {"cb": {"accuracy": 0.5, "f1": 0.25, "score": 0.375},
                                     "copa": {"accuracy": 0.625, "score": 0.625}}},
            {"model": "/models/llama-7b/", "tasks": {"record": {"f1": 0.8, "em": 0.75, "score": 0.775}}}]
    assert render_table(runs) == (
        "| Run | CB (acc/F1) | COPA (acc) | ReCoRD (F1/EM) | Avg |\n"
        "|---|:---:|:---:|:---:|:---:|\n"
        "| zs | 50.0/25.0 | 62.5 | – | 50.0 |\n"
        "| llama-7b | – | – | 80.0/75.0 | 77.5 |\n")
