"""The data layer (lomo_trainer.data) and the shipped default assets.

Expected ids are spelled out token by token from the shipped word-level vocabulary, not produced by the
code under test, so a boundary or truncation error shows as a mismatch.
"""
import csv
import json
from pathlib import Path

import pytest
import torch

from lomo_trainer.data import CausalLMCollator, build_datasets

ASSETS = Path(__file__).resolve().parent.parent / "lomo_trainer" / "assets"
TINY = ASSETS / "tiny-llama"
SENTIMENT = ASSETS / "sentiment"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def ids(tok, *tokens):
    out = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in out, f"test words missing from the vocab: {tokens}"
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tok, tmp_path, rows, **kw):
    return build_datasets(tok, train_file=write_jsonl(tmp_path / "train.jsonl", rows), **kw)


def test_prompt_masking_is_exact_at_the_boundary(tok, tmp_path):
    rows = [{"prompt": "review: not good movie sentiment:", "completion": " negative"},
            {"prompt": "review: great", "completion": " film was fun"}]
    train = build(tok, tmp_path, rows)["train"]
    s, e = tok.bos_token, tok.eos_token
    prompts = [ids(tok, s, "review", ":", "not", "good", "movie", "sentiment", ":"), ids(tok, s, "review", ":", "great")]
    completions = [ids(tok, "negative", e), ids(tok, "film", "was", "fun", e)]
    for ex, p, c in zip(train, prompts, completions):
        assert ex["input_ids"] == p + c
        assert ex["labels"] == [-100] * len(p) + c  # aligned with input_ids: the model shifts them itself
        assert ex["attention_mask"] == [1] * (len(p) + len(c))


def test_text_column_supervises_every_token(tok, tmp_path):
    train = build(tok, tmp_path, [{"text": "the film was great", "other": 1}])["train"]
    expected = ids(tok, tok.bos_token, "the", "film", "was", "great", tok.eos_token)
    assert train.column_names == ["input_ids", "attention_mask", "labels"]
    assert train[0]["input_ids"] == expected and train[0]["labels"] == expected


def test_prompt_completion_wins_over_text_when_both_present(tok, tmp_path):
    rows = [{"text": "ignored words", "prompt": "review:", "completion": " positive"}]
    ex = build(tok, tmp_path, rows)["train"][0]
    assert ex["input_ids"] == ids(tok, tok.bos_token, "review", ":", "positive", tok.eos_token)
    assert ex["labels"][:3] == [-100] * 3


def test_custom_column_names(tok, tmp_path):
    rows = [{"q": "review: good", "a": " positive"}]
    ex = build(tok, tmp_path, rows, prompt_column="q", completion_column="a")["train"][0]
    assert ex["labels"] == [-100] * 4 + ids(tok, "positive", tok.eos_token)


def test_truncation_cuts_the_prompt_from_the_left(tok, tmp_path):
    words = "the movie was good and the acting was great".split()
    rows = [{"prompt": " ".join(words), "completion": " positive"}]
    ex = build(tok, tmp_path, rows, max_length=5)["train"][0]
    completion = ids(tok, "positive", tok.eos_token)
    assert ex["input_ids"] == ids(tok, "acting", "was", "great") + completion
    assert ex["labels"] == [-100] * 3 + completion
    assert len(ex["input_ids"]) == 5


def test_truncation_of_a_completion_longer_than_max_length(tok, tmp_path):
    rows = [{"prompt": "review: good", "completion": " the film was great and fun"}]
    ex = build(tok, tmp_path, rows, max_length=4)["train"][0]
    # the prompt's last token stays (it predicts the first completion token), the completion's end goes
    assert ex["input_ids"] == ids(tok, "good", "the", "film", "was")
    assert ex["labels"] == [-100] + ids(tok, "the", "film", "was")


def test_text_truncation_keeps_the_start(tok, tmp_path):
    ex = build(tok, tmp_path, [{"text": "the film was great and fun"}], max_length=3)["train"][0]
    assert ex["input_ids"] == ex["labels"] == ids(tok, tok.bos_token, "the", "film")


def test_examples_without_a_supervised_token_are_dropped(tok, tmp_path):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(TINY)
    no_eos.eos_token = None  # so an empty completion leaves nothing to learn
    assert no_eos.eos_token_id is None
    rows = [{"prompt": "review: good", "completion": ""}, {"prompt": "review: bad", "completion": " negative"}]
    train = build(no_eos, tmp_path, rows)["train"]
    assert len(train) == 1
    assert train[0]["labels"] == [-100] * 4 + ids(tok, "negative")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "txt"])
def test_local_files_load(tok, tmp_path, fmt):
    texts = ["the film was great", "the plot was dull", "it was fine"]
    train, val = tmp_path / f"train.{fmt}", tmp_path / f"validation.{fmt}"
    for path, part in ((train, texts), (val, texts[:1])):
        if fmt in ("jsonl", "json"):
            write_jsonl(path, [{"text": t} for t in part])
        elif fmt == "csv":
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerows([["text"]] + [[t] for t in part])
        else:
            path.write_text("\n".join(part) + "\n")
    out = build_datasets(tok, train_file=str(train), validation_file=str(val))
    assert len(out["train"]) == 3 and len(out["validation"]) == 1
    assert out["validation"][0]["input_ids"] == ids(tok, tok.bos_token, "the", "film", "was", "great", tok.eos_token)


def test_no_validation_gives_none_and_validation_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"text": " ".join(["good"] * (i + 1))} for i in range(20)]
    assert build(tok, tmp_path, rows)["validation"] is None
    a = build(tok, tmp_path, rows, validation_split=0.25, seed=3)
    b = build(tok, tmp_path, rows, validation_split=0.25, seed=3)
    assert (len(a["train"]), len(a["validation"])) == (15, 5)
    lengths = lambda ds: [len(x) for x in ds["input_ids"]]  # each row has a distinct length  # noqa: E731
    assert not set(lengths(a["train"])) & set(lengths(a["validation"]))
    assert lengths(a["validation"]) == lengths(b["validation"])


def test_subsampling_is_seeded(tok, tmp_path):
    rows = [{"text": " ".join(["good"] * (i + 1))} for i in range(30)]
    pick = lambda seed: sorted(len(x) for x in build(tok, tmp_path, rows, max_train_samples=6,  # noqa: E731
                                                      seed=seed)["train"]["input_ids"])
    assert len(pick(0)) == 6 and len(set(pick(0))) == 6
    assert pick(0) == pick(0)
    assert pick(0) != pick(1)
    assert len(build(tok, tmp_path, rows, max_train_samples=100)["train"]) == 30


def test_collator_pads_right(tok):
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
             {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    pad = tok.pad_token_id
    b = CausalLMCollator(tok)(feats)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    b = CausalLMCollator(tok, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, pad], [8, pad, pad, pad]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


def test_collator_falls_back_to_eos_without_a_pad_token():
    class Tok:
        pad_token_id, eos_token_id = None, 3

    b = CausalLMCollator(Tok())([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]},
                                 {"input_ids": [7], "attention_mask": [1], "labels": [7]}])
    assert b["input_ids"].tolist() == [[5, 6], [7, 3]]
    assert b["labels"].tolist() == [[5, 6], [7, -100]]

    class NoPad:
        pad_token_id = eos_token_id = None

    with pytest.raises(ValueError, match="pad_token"):
        CausalLMCollator(NoPad())


def test_collated_batch_trains_a_llama(tok, tmp_path):
    """The batch layout is what LlamaForCausalLM expects: labels shifted inside, -100 ignored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = [{"prompt": "review: not good movie sentiment:", "completion": " negative"},
            {"prompt": "review: great sentiment:", "completion": " positive"}]
    train = build(tok, tmp_path, rows)["train"]
    batch = CausalLMCollator(tok)(list(train))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # independent loss: predict token t+1 at position t, only where the next label is supervised
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1),
                                           ignore_index=-100)
    assert (target != -100).sum() == 4  # label + eos in each row
    assert torch.allclose(model(**batch).loss, ce, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "set dataset_name .* or train_file"),
    ({"dataset_name": "x", "train_file": "t.jsonl"}, "dataset_name and train_file"),
    ({"validation_file": "v.jsonl"}, "validation_file is set but train_file"),
    ({"train_file": "data.parquet"}, "train_file=.*extension"),
    ({"train_file": "missing.jsonl"}, "train_file=.*does not exist"),
    ({"train_file": "TRAIN", "max_length": 1}, "max_length"),
    ({"train_file": "TRAIN", "max_train_samples": 0}, "max_train_samples"),
    ({"train_file": "TRAIN", "max_eval_samples": 0}, "max_eval_samples"),
    ({"train_file": "TRAIN", "validation_split": 1.5}, "validation_split"),
    ({"train_file": "TRAIN", "validation_file": "VAL", "validation_split": 0.1}, "validation_split"),
    ({"train_file": "TRAIN", "completion_column": "answer"}, "no column 'answer'.*set completion_column or text_column"),
    ({"train_file": "TRAIN", "prompt_column": "question"}, "no column 'question'.*set prompt_column or text_column"),
    ({"train_file": "TRAIN", "text_column": "body", "prompt_column": "q", "completion_column": "a"},
     "no column 'body'.*set text_column"),
    ({"train_file": "TRAIN", "validation_file": "BADVAL"}, "validation dataset has no column 'completion'"),
    ({"train_file": "NUMBERS"}, "column 'completion' holds a int"),
])
def test_bad_input_names_the_key(tok, tmp_path, monkeypatch, kwargs, match):
    monkeypatch.chdir(tmp_path)
    files = {"TRAIN": [{"prompt": "review: good", "completion": " positive"}],
             "VAL": [{"prompt": "review: bad", "completion": " negative"}],
             "BADVAL": [{"prompt": "review: bad", "answer": " negative"}],
             "NUMBERS": [{"prompt": "review: bad", "completion": 1}]}
    for key, value in kwargs.items():
        if value in files:
            kwargs[key] = write_jsonl(tmp_path / f"{value}.jsonl", files[value])
    with pytest.raises(ValueError, match=match):
        build_datasets(tok, **kwargs)


# ------------------------------------------------------------------ the shipped default assets
def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_llama_builds_from_config_offline(tok):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, LlamaForCausalLM)
    assert config.vocab_size == len(tok)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.pad_token_id != tok.eos_token_id
    assert not [p.name for p in TINY.iterdir() if p.suffix in (".bin", ".safetensors", ".pt")], "no weights shipped"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_sentiment_task_is_balanced_disjoint_and_in_vocab(tok):
    train, val = read_jsonl(SENTIMENT / "train.jsonl"), read_jsonl(SENTIMENT / "validation.jsonl")
    assert 4000 <= len(train) <= 8000 and 400 <= len(val) <= 500
    for path in SENTIMENT.glob("*.jsonl"):
        assert path.stat().st_size < 1_000_000
    for rows in (train, val):
        completions = [r["completion"] for r in rows]
        assert set(completions) == {" positive", " negative"}
        assert abs(completions.count(" positive") - completions.count(" negative")) <= 1
        assert all(r["prompt"].startswith("review: ") and r["prompt"].endswith(" sentiment:") for r in rows)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    words = {w for r in train + val for w in (r["prompt"] + r["completion"]).replace(":", " : ").split()}
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(sorted(words))
    # the completion is a single token, so its log-likelihood is one logit
    assert [len(tok(c, add_special_tokens=False)["input_ids"]) for c in (" positive", " negative")] == [1, 1]


def test_shipped_assets_tokenise(tok):
    out = build_datasets(tok, train_file=str(SENTIMENT / "train.jsonl"),
                         validation_file=str(SENTIMENT / "validation.jsonl"), max_length=32,
                         max_train_samples=200, max_eval_samples=50)
    assert (len(out["train"]), len(out["validation"])) == (200, 50)
    ex = out["train"][0]
    assert max(len(x) for x in out["train"]["input_ids"]) <= 32
    assert ex["input_ids"][0] == tok.bos_token_id
    assert ex["labels"][-2:] == ex["input_ids"][-2:] and ex["input_ids"][-1] == tok.eos_token_id
    assert sum(label != -100 for label in ex["labels"]) == 2


# ------------------------------------------------------------------ bad data: one line naming the file, line or row
from types import SimpleNamespace  # noqa: E402

from lomo_trainer.errors import ConfigError  # noqa: E402
from lomo_trainer.data import precheck_data  # noqa: E402

GOOD = [{"prompt": f"review: good {i}", "completion": " positive"} for i in range(300)]


def lines(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def run_args(**kw):
    base = dict(dataset_name=None, train_file=None, validation_file=None, max_length=32, max_train_samples=None,
                max_eval_samples=None, validation_split=None, text_column="text", prompt_column="prompt",
                completion_column="completion")
    return SimpleNamespace(**{**base, **kw})


def with_row(index, row):
    rows = list(GOOD)
    rows[index] = row
    return rows


NON_UTF8 = lines(GOOD[:3]).encode() + b'{"prompt": "caf\xe9", "completion": " positive"}\n'
BAD_FILES = [  # (content, message at start-up (first 100 rows), message when loaded)
    ("", r"train_file='.*train.jsonl' is empty: it needs at least one example", None),
    ("\n\n", r"train.jsonl' is empty", None),
    (lines(with_row(40, '{"prompt": "review: x", "completion": ')), r"train.jsonl' line 41: invalid JSON "
     r"\(Expecting value at column 38\): each line must be one JSON object", None),
    (lines(with_row(250, '{"prompt": "review: x", "completion": ')), None, r"train.jsonl' line 251: invalid JSON"),
    (lines(with_row(40, {"prompt": "review: x"})), r"train.jsonl' line 41: no 'completion' \(fields: \['prompt'\]\): "
     r"every row needs 'prompt' and 'completion'", r"train.jsonl' row 41: no 'completion' \(missing or null\)"),
    (lines(with_row(250, {"prompt": "review: x"})), None, r"train.jsonl' row 251: no 'completion' \(missing or null\)"),
    (lines(with_row(40, {"prompt": "review: x", "completion": 3})), r"train.jsonl' line 41: 'completion' holds a "
     r"int, not text: write it as a JSON string", r"train.jsonl' row 41: column 'completion' holds a int, not text"),
    (lines(with_row(250, {"prompt": "review: x", "completion": 3})), None,
     r"train.jsonl' row 251: column 'completion' holds a int, not text"),
    (NON_UTF8, r"train.jsonl' is not UTF-8: byte %d \(line 4\) cannot be decoded; re-encode the file as UTF-8"
     % (len(lines(GOOD[:3]).encode()) + 15), None),
    (lines(with_row(250, "[1, 2]")), None, r"train.jsonl' line 251: a JSON list, not an object"),
]


@pytest.mark.parametrize("content, at_start, at_load", BAD_FILES)
def test_bad_data_files_are_one_line(tok, tmp_path, content, at_start, at_load):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if at_start:
        with pytest.raises(ConfigError, match=at_start) as info:
            precheck_data(run_args(train_file=str(path)))
        assert "\n" not in str(info.value)
    else:
        precheck_data(run_args(train_file=str(path)))  # only the first rows are read before the process group
    with pytest.raises(ConfigError, match=at_load or at_start) as info:
        build_datasets(tok, train_file=str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw, match", [
    (dict(max_length=-1), r"max_length must be an integer >= 2 \(tokens per example\), got -1"),
    (dict(max_length=8.5), r"max_length must be an integer >= 2"),
    (dict(), r"no training data: set dataset_name"),
    (dict(train_file="TRAIN", validation_file="VAL"), r"validation_file='.*val.jsonl' line 1: no 'completion'"),
    (dict(train_file="TRAIN", completion_column="answer"), r"train_file='.*' has no column 'answer'"),
    (dict(train_file="CSV", completion_column="answer"), r"train_file='.*train.csv' has no column 'answer'"),
])
def test_precheck_data(tmp_path, kw, match):
    files = {"TRAIN": ("train.jsonl", lines(GOOD[:2])), "VAL": ("val.jsonl", lines([{"prompt": "x", "label": 1}])),
             "CSV": ("train.csv", "prompt,completion\nreview: good, positive\n")}
    for key, value in kw.items():
        if value in files:
            name, text = files[value]
            (tmp_path / name).write_text(text)
            kw[key] = str(tmp_path / name)
    with pytest.raises(ConfigError, match=match) as info:
        precheck_data(run_args(**kw))
    assert "\n" not in str(info.value)
    precheck_data(run_args(train_file=str(SENTIMENT / "train.jsonl"), validation_file=str(SENTIMENT / "validation.jsonl")))


class SpyTokenizer:
    """The tiny tokenizer, recording the longest text it was given."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_huge_row_is_cut_before_tokenising_and_truncates_exactly(tok, tmp_path):
    """A 4 MB row used to be tokenised whole (a 40 MB one took 40 s and 4.5 GB per rank)."""
    rows = [{"prompt": "review: " + "good " * 800_000 + "bad sentiment:", "completion": " negative"},
            {"prompt": "review: fun", "completion": " the" + " film" * 800_000},
            {"text": None, "prompt": "review: fun", "completion": " positive"}]
    rows[2].pop("text")
    spy = SpyTokenizer(tok)
    train = build(spy, tmp_path, rows, max_length=8)["train"]
    assert spy.longest <= 8 * 32, "the tokenizer saw a text longer than the cap"
    completion = ids(tok, "negative", tok.eos_token)
    assert train[0]["input_ids"] == ids(tok, "good", "good", "good", "bad", "sentiment", ":") + completion
    assert train[0]["labels"] == [-100] * 6 + completion
    assert train[1]["input_ids"] == ids(tok, "fun", "the") + ids(tok, "film") * 6
    assert train[2]["input_ids"] == ids(tok, tok.bos_token, "review", ":", "fun", "positive", tok.eos_token)


def test_capped_tokenising_equals_whole_tokenising_with_long_tokens(tok):
    """Where the cut leaves too few tokens (tokens far longer than 32 characters), it is widened: same ids as
    tokenising the whole text, in the part truncation keeps."""
    from lomo_trainer.data import _assemble, _tokenize_capped

    long_word = "x" * 300  # one (unknown) token per 300 characters
    texts = [" ".join([long_word] * 50) + " good", "good " + " ".join([long_word] * 50), "good bad " * 3]
    for keep_end in (True, False):
        capped = _tokenize_capped(tok, texts, 4, keep_end=keep_end, add_special_tokens=True)
        whole = tok(texts, add_special_tokens=True)["input_ids"]
        if keep_end:
            assert [c[-4:] for c in capped] == [w[-4:] for w in whole]
        else:
            assert [c[:4] for c in capped] == [w[:4] for w in whole]
    pairs = lambda p, c: list(zip(p, c))  # noqa: E731
    full = tok(texts, add_special_tokens=True)["input_ids"]
    capped_p = _tokenize_capped(tok, texts, 4, keep_end=True, add_special_tokens=True)
    capped_c = _tokenize_capped(tok, texts, 4, keep_end=False, add_special_tokens=False)
    full_c = tok(texts, add_special_tokens=False)["input_ids"]
    assert _assemble(pairs(capped_p, capped_c), 4) == _assemble(pairs(full, full_c), 4)
