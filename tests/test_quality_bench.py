"""bench.quality's data builder (on a small fake stdlib folder) and scoring (tiny random model, a stub with known
log-probabilities): fast, CPU, no download. The benchmark itself is not a test."""
import math
import os
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from lomo_trainer.bench.quality import data
from lomo_trainer.bench.quality.data import Item, build, collect, first_sentence, multiple_choice
from lomo_trainer.bench.quality.scoring import encode_examples, heldout_loss, mc_accuracy, train_features
from models import tiny_llama

TOKENIZER = os.path.join(os.path.dirname(data.__file__), "..", "..", "assets", "tiny-llama")


def _fake_stdlib(root):
    """16 modules of 3 documented functions each, plus what the builder must skip."""
    for m in range(16):
        src = "".join(textwrap.dedent(f'''
            def func{f}(x, y=1):
                """Return the result number {f} of module {m} as a value.

                More text that is not the summary.
                """

            ''') for f in range(3))
        src += textwrap.dedent(f'''
            class Thing{m}:
                """A thing defined in module mod{m} for testing."""
                def method(self):
                    """Compute the method value of thing {m} here."""
                def _private(self):
                    """Private helpers are not part of the task."""

            def nodoc():
                pass

            def shared():
                """This docstring is repeated in every module."""
            ''')
        (root / f"mod{m}.py").write_text(src)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('def test_a():\n    """A test function is skipped entirely."""\n')
    (root / "_private_mod.py").write_text('def f():\n    """Private modules are skipped entirely."""\n')
    (root / "broken.py").write_text("def (:\n")


def test_first_sentence():
    assert first_sentence("Return the value of x.  More.\n\nOther") == "Return the value of x."
    assert first_sentence("Return the value\nof x. Then y.") == "Return the value of x."
    assert first_sentence("Short.") is None                      # under 20 characters
    assert first_sentence(">>> f(1)\n1 is the result of it all") is None
    assert first_sentence("x" * 200) is None                     # over the length cap


def test_builder_deterministic_disjoint_non_empty(tmp_path):
    _fake_stdlib(tmp_path)
    items = collect(str(tmp_path))
    names = {it.name for it in items}
    assert "mod3.func1" in names and "mod3.Thing3" in names and "mod3.Thing3.method" in names
    assert not any("_private" in n or "test" in n or "nodoc" in n or "broken" in n for n in names)
    assert sum(it.summary == "This docstring is repeated in every module." for it in items) == 1  # no alias leaks
    assert len(items) == 16 * 5 + 1

    a, b = build(seed=3, held_out=0.25, root=str(tmp_path)), build(seed=3, held_out=0.25, root=str(tmp_path))
    assert a == b                                                         # deterministic, order included
    assert all(a[s] for s in data.SPLITS)                                 # no split empty
    modules = {s: {it.module for it in a[s]} for s in data.SPLITS}
    texts = {s: {it.summary for it in a[s]} for s in data.SPLITS}
    for s, t in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not modules[s] & modules[t] and not texts[s] & texts[t]    # disjoint by module and by text
    for it in a["train"] + a["dev"] + a["test"]:
        assert it.module and it.name.startswith(it.module + ".") and it.summary.strip() == it.summary
        assert it.prompt.endswith(":") and it.completion.startswith(" ") and len(it.completion) > 20
    assert build(seed=4, held_out=0.25, root=str(tmp_path)) != a          # the seed matters


def test_multiple_choice_questions():
    items = [Item("m", f"m.f{i}", f"Return value number {i} " + "x" * i + ".") for i in range(12)]
    qs = multiple_choice(items, n_choices=4, seed=1)
    assert qs == multiple_choice(items, n_choices=4, seed=1)
    assert len(qs) == len(items)
    for it, (ctx, cands, answer) in zip(items, qs):
        assert ctx == it.prompt and cands[answer] == it.completion
        assert len(cands) == 4 and len(set(cands)) == 4
        # distractors come from the 8 items nearest in length (a window of 9 with the item; here ~1 char apart each)
        assert all(abs(len(c) - len(it.completion)) <= 9 for c in cands)
    assert len({q[2] for q in qs}) > 1                                    # the answer's position varies
    with pytest.raises(ValueError):
        multiple_choice(items[:3], n_choices=4)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_heldout_loss_equals_the_training_loss(tok):
    """The held-out loss is the token mean of exactly what training minimises: HF's own loss on the rows."""
    model = tiny_llama(vocab=len(tok)).eval()
    items = [Item("m", "m.f", "good film never boring"), Item("m", "m.g", "great great plot"),
             Item("m", "m.h", "a lovely fine charming warm film sentiment")]
    pairs = encode_examples(tok, items, max_length=32)
    assert all(cont[-1] == tok.eos_token_id for _, cont in pairs)
    rows = train_features(pairs)
    total = n = 0.0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding, HF's mean over its label tokens
            k = sum(t != -100 for t in row["labels"]) 
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            total += out.loss.item() * k
            n += k
    assert heldout_loss(model, pairs, pad_id=tok.pad_token_id, batch_size=2) == pytest.approx(total / n, rel=1e-5)


class FixedLogits(nn.Module):
    """Logits that ignore the input: token ``fav`` has probability 1/2, the rest share the other half."""

    def __init__(self, vocab, fav):
        super().__init__()
        self.vocab, self.fav = vocab, fav
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.fav] = math.log(self.vocab - 1)
        return type("Out", (), {"logits": logits})()


def test_mc_accuracy_hand_computed(tok):
    """With fixed log-probabilities the summed scores are known: log(1/2) for the favoured word, log(1/(2(V-1)))
    for any other, so a sum favours the shorter of two candidates made of the favoured word."""
    v = len(tok)
    fav = tok.convert_tokens_to_ids("good")
    model = FixedLogits(v, fav)
    questions = [
        ("review :", [" bad", " good"], 1),              # good wins: right
        ("review :", [" good good", " good"], 0),        # "good" (log 1/2) beats "good good" (2 log 1/2): wrong
        ("review :", [" great", " good great"], 0),      # "great" alone beats "good great": right
    ]
    assert mc_accuracy(model, tok, questions, max_length=32) == pytest.approx(2 / 3)


def test_mc_accuracy_matches_an_independent_forward(tok):
    """On a tiny random model: the accuracy equals one computed from a full forward of each prompt+candidate."""
    model = tiny_llama(vocab=len(tok), seed=1).eval()
    words = ["good film", "bad plot never", "great", "boring boring film", "lovely warm", "not fine"]
    questions = [("review : " + w, [" " + c for c in words[i:i + 3] + words[:max(0, i - 3)]][:3], i % 3)
                 for i, w in enumerate(words)]
    right = 0
    with torch.no_grad():
        for ctx, cands, answer in questions:
            scores = []
            for c in cands:
                p = tok(ctx)["input_ids"]
                q = tok(c, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + q])).logits[0].double(), -1)
                scores.append(sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(q)))
            right += max(range(len(scores)), key=lambda i: (scores[i], -i)) == answer
    assert mc_accuracy(model, tok, questions, max_length=64) == pytest.approx(right / len(questions))
