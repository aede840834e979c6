"""ranking.score_candidates against a direct float64 forward of each full sequence, and 1 rank vs 3 ZeRO-3 ranks."""
import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer.ranking import pick, score_candidates
from models import DS_CONFIG, tiny_llama

WORDS = "the cat sat on a mat dog ran far yes no maybe is it true false red blue green sky sea".split()
VOCAB = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}

# 7 requests, 17 candidates: neither divides by 3; lengths vary so batches need padding.
REQUESTS = [
    ("the cat sat on", [" a mat", " the dog", " sea"]),
    ("is it true", [" yes", " no"]),
    ("the sky is", [" blue", " green", " red sea", " the blue sea"]),
    ("dog", [" ran far"]),
    ("", [" the cat"]),
    ("a red dog ran on the mat is it", [" true", " false", " maybe"]),
    ("the sea is blue", [" yes", " no", " maybe yes"]),
]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


def reference(model, context, candidate):
    """Log-likelihood from one unpadded float64 forward of BOS + context + candidate, ids looked up by hand."""
    ctx = [1] + [VOCAB[w] for w in context.split()]
    cont = [VOCAB[w] for w in candidate.split()]
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model.double()(input_ids=full).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    # token at position t is predicted by the logits at t - 1
    total = sum(logp[len(ctx) + j - 1, tok].item() for j, tok in enumerate(cont))
    return total, len(cont)


def test_scores_match_direct_forward():
    model, tok = tiny_llama(), tokenizer()
    got = score_candidates(model, tok, REQUESTS, batch_size=3)
    ref_model = tiny_llama()
    ref_model.eval()
    assert [len(g) for g in got] == [len(c) for _, c in REQUESTS]
    for (ctx, cands), scores in zip(REQUESTS, got):
        for cand, (lp, n) in zip(cands, scores):
            exp_lp, exp_n = reference(ref_model, ctx, cand)
            assert n == exp_n
            assert lp == pytest.approx(exp_lp, abs=1e-4), (ctx, cand)
    # batch size must not matter beyond rounding
    one = score_candidates(model, tok, REQUESTS, batch_size=1)
    for a, b in zip(got, one):
        for (x, n), (y, m) in zip(a, b):
            assert n == m and x == pytest.approx(y, abs=1e-5)


def test_max_length_drops_context_from_the_left():
    model, tok = tiny_llama(), tokenizer()
    ctx, cand = "a red dog ran on the mat is it", " true"
    (lp, n), = score_candidates(model, tok, [(ctx, [cand])], max_length=5)[0]
    # max_length counts context + continuation, as a training example: the last 4 context tokens + "true"
    ids = torch.tensor([[VOCAB["the"], VOCAB["mat"], VOCAB["is"], VOCAB["it"]]])
    with torch.no_grad():
        model.eval()
        exp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)[VOCAB["true"]].item()
    assert n == 1 and lp == pytest.approx(exp, abs=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        score_candidates(model, tok, [("the", [" the cat sat on a"])], max_length=3)


def test_add_eos_scores_the_eos_too():
    model, tok = tiny_llama(), tokenizer()
    tok.eos_token = "sea"  # any id: what matters is that it is appended, scored and counted
    eos = VOCAB["sea"]
    (lp, n), = score_candidates(model, tok, [("is it", [" true"])], add_eos=True)[0]
    ids = torch.tensor([[1, VOCAB["is"], VOCAB["it"], VOCAB["true"]]])
    with torch.no_grad():
        model.eval()
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    assert n == 2 and lp == pytest.approx(logp[2, VOCAB["true"]].item() + logp[3, eos].item(), abs=1e-5)
    assert score_candidates(model, tok, [("is it", [" true"])])[0][0][1] == 1  # default: no EOS


def test_pick_normalisations_and_ties():
    scores = [(-6.0, 3), (-4.0, 1), (-6.0, 4)]
    assert pick(scores, "sum") == 1
    assert pick([(-6.0, 3), (-6.0, 2)], "sum") == 0  # tie: lowest index
    assert pick([(-6.0, 3), (-5.0, 1), (-6.0, 4)], "token") == 2  # -1.5 beats -5 and -2
    assert pick([(-6.0, 3), (-4.0, 1)], "char", candidates=[" a long answer", " no"]) == 0  # -6/14 > -4/3
    with pytest.raises(ValueError, match="candidates"):
        pick(scores, "char")
    with pytest.raises(ValueError, match="normalize"):
        pick(scores, "mean")


def rank_scores(rank, world):
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    rows, calls = [], [0]

    def record(_module, _args, kwargs):  # every row fed in, without its padding
        calls[0] += 1
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            rows.append(tuple(ids[mask.bool()].tolist()))

    engine.module.register_forward_pre_hook(record, with_kwargs=True)
    scores = score_candidates(engine.module, tokenizer(), REQUESTS, batch_size=2)
    return scores, rows, calls[0]


@pytest.mark.multirank
def test_three_zero3_ranks_match_one_rank_each_item_once():
    (single, single_rows, _), = run_ranks(rank_scores, 1)
    results = run_ranks(rank_scores, 3)
    assert len({calls for _, _, calls in results}) == 1, "ranks ran different numbers of forward passes"
    # The union of real rows over ranks is exactly the single-rank rows: each candidate scored once.
    dummy = (0,)
    multi_rows = sorted(r for _, rows, _ in results for r in rows if r != dummy)
    assert multi_rows == sorted(single_rows)
    assert len(multi_rows) == sum(len(c) for _, c in REQUESTS)
    for scores, _, _ in results:
        assert [len(s) for s in scores] == [len(c) for _, c in REQUESTS]
        for a, b in zip(scores, single):
            for (x, n), (y, m) in zip(a, b):
                assert n == m and x == pytest.approx(y, abs=1e-5)
        assert [pick(s) for s in scores] == [pick(s) for s in single]
