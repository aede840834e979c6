"""Write the shipped default assets: a tiny LLaMA config, its word-level tokenizer and a synthetic sentiment task.

Run from the repository root (deterministic: the same files every time)::

    .venv/bin/python scripts/make_default_assets.py

Writes
    lomo_trainer/assets/tiny-llama/        config.json + tokenizer files (no weights: the default run
                                           initialises the model from the config, seeded)
    lomo_trainer/assets/sentiment/         train.jsonl, validation.jsonl with prompt/completion columns

The task: a "review" of 6-12 words mixes neutral filler with 2-4 sentiment words. A negator ("not",
"never") right before a sentiment word flips it. All (effective) sentiment words of a review agree, so
the label is well defined, but the model must look at the previous token to read a negated word. The
prompt is ``review: <words> sentiment:``, the completion `` positive`` or `` negative``, balanced.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lomo_trainer" / "assets"
SEED = 1234
N_TRAIN, N_VALIDATION = 6000, 500

POSITIVE = """good great excellent wonderful superb lovely brilliant amazing delightful charming enjoyable
pleasant fantastic fine solid fresh clever moving beautiful perfect nice fun gripping warm
impressive memorable stunning touching witty elegant""".split()
NEGATIVE = """bad awful terrible horrible poor dull boring weak bland messy tedious annoying clumsy painful
ugly stale lazy silly shallow sloppy disappointing forgettable mediocre dreadful flat cold confusing
pointless lifeless clunky""".split()
NEUTRAL = """the a an this that movie film story plot acting cast music script ending scene scenes director
actor actress camera sound pace dialogue characters it was is were seemed felt looked and but
with of in on at for from to by as overall really quite very rather somewhat also just still then
today yesterday evening weekend theater screen version sequel remake book show episode season
kind sort part bit lot""".split()
NEGATORS = ["not", "never"]
LABELS = {1: "positive", 0: "negative"}
PROMPT_WORDS = ["review", ":", "sentiment"]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
N_WORDS = (6, 12)      # review length range, negators included
N_SENTIMENT = (2, 4)   # sentiment words per review
P_NEGATE = 0.25        # chance that a sentiment word is negated


def make_review(rng: random.Random, label: int) -> str:
    n_words = rng.randint(*N_WORDS)
    units = []  # a sentiment unit is [word] or [negator, word]; its effective polarity is `label`
    for _ in range(rng.randint(*N_SENTIMENT)):
        negated = rng.random() < P_NEGATE
        polarity = label ^ negated  # a negated word must carry the opposite surface polarity
        word = rng.choice(POSITIVE if polarity else NEGATIVE)
        units.append([rng.choice(NEGATORS), word] if negated else [word])
    n_filler = max(0, n_words - sum(len(u) for u in units))
    filler = [[rng.choice(NEUTRAL)] for _ in range(n_filler)]
    pieces = units + filler
    rng.shuffle(pieces)
    return " ".join(w for piece in pieces for w in piece)


def make_examples(rng: random.Random, n: int) -> list[dict]:
    seen, rows = set(), []
    while len(rows) < n:
        label = len(rows) % 2  # alternate: exactly balanced
        review = make_review(rng, label)
        if review in seen:  # unique reviews, so the train/validation split is disjoint by construction
            continue
        seen.add(review)
        rows.append({"prompt": f"review: {review} sentiment:", "completion": f" {LABELS[label]}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # "sentiment:" -> "sentiment", ":"
    # add_bos_token: like LLaMA's tokenizer, prepend <s> to every encoded text (with add_special_tokens).
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", add_bos_token=True, add_eos_token=False,
                                   model_max_length=128)


def main() -> None:
    rng = random.Random(SEED)
    rows = make_examples(rng, N_TRAIN + N_VALIDATION)  # labels alternate, so both splits are balanced
    train, validation = rows[:N_TRAIN], rows[N_TRAIN:]
    rng.shuffle(train)
    rng.shuffle(validation)
    write_jsonl(ROOT / "sentiment" / "train.jsonl", train)
    write_jsonl(ROOT / "sentiment" / "validation.jsonl", validation)

    words = list(dict.fromkeys(PROMPT_WORDS + list(LABELS.values()) + NEGATORS + POSITIVE + NEGATIVE + NEUTRAL))
    tokenizer = build_tokenizer(words)
    out = ROOT / "tiny-llama"
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name; the generic name also loads under transformers 4.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Larger than LLaMA's 0.02: with plain SGD from scratch the model leaves its first plateau sooner.
        initializer_range=0.1)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    print(f"wrote {len(train)} train / {len(validation)} validation examples and a {len(tokenizer)}-token "
          f"tokenizer under {ROOT}")


if __name__ == "__main__":
    main()
