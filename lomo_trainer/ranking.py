"""Rank candidate continuations by their log-likelihood under a causal LM.

Public API (stable):

    score_candidates(model, tokenizer, requests, *, batch_size=8, max_length=None, device=None, group=None,
                     add_eos=False)
        -> list[list[tuple[float, int]]]
    score_pairs(model, [(context ids, continuation ids), ...], *, pad_id=None, batch_size=8, device=None,
                group=None) -> list[float]
    encode_pair(tokenizer, context, continuation, max_length, add_eos=False) -> (context ids, continuation ids)
    pick(scores, normalize="sum", candidates=None) -> int
    NORMALIZATIONS = ("sum", "token", "char")
    with between_batches(fn): ...   # fn() after every batch scored inside, on every rank alike

``requests`` is a sequence of ``(context, [continuation, ...])``. For every continuation the result holds
``(logprob, n_tokens)``: the summed log-likelihood (natural log) of the continuation's tokens given the
context, and how many tokens it has, in the order given. ``pick`` turns one request's scores into the index
of the best candidate: ``"sum"`` ranks by the summed log-likelihood, ``"token"`` by it divided by the token
count, ``"char"`` by it divided by the candidate's character count (pass ``candidates``). Ties go to the
lowest index.

Tokenisation: the context is tokenised with the tokenizer's special tokens (a BOS where the tokenizer adds
one), the continuation without, separately, and the ids are concatenated. Put the separating space at the
start of the continuation (``" yes"``), as the SuperGLUE templates do. A context that tokenises to nothing
is replaced by the BOS (or else EOS) token, so the first continuation token is always conditioned on
something. ``add_eos`` appends the tokenizer's EOS (if it has one) to every continuation, scored and counted
like its other tokens. A context + continuation longer than ``max_length`` tokens (default: the model's
``max_position_embeddings``) loses context tokens from the left; a continuation that does not fit alone is
an error. Both rules are those of ``lomo_trainer.data``'s prompt/completion training examples (which end
with EOS), so ``add_eos=True`` with the training ``max_length`` scores exactly the sequences trained on.

Distributed: when ``torch.distributed`` is initialised, every rank must pass the same ``requests``; each
rank scores a share and the results are gathered, so every rank returns the full result and every
continuation is scored exactly once. All ranks run the same number of forward passes (ranks that run out
of work run one-token dummy batches), as ZeRO-3 gathers parameters collectively in forward. Scores agree
with a single-rank run up to float rounding (batches are padded differently).

``between_batches`` lets a caller act between two forward passes without threading an argument through every
layer that reaches ``score_pairs``: a trainer evaluating by ranking uses it to stop at a signal between batches
(``fn`` may all-reduce: every rank runs the same number of batches).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist

from .data import keep_prompt_end

NORMALIZATIONS = ("sum", "token", "char")


def pick(scores: Sequence[tuple[float, int]], normalize: str = "sum", candidates: Sequence[str] | None = None) -> int:
    """Index of the best candidate of one request (ties: the lowest index)."""
    if not scores:
        raise ValueError("pick() got no candidate scores; every request needs at least one candidate.")
    if normalize == "sum":
        values = [lp for lp, _ in scores]
    elif normalize == "token":
        values = [lp / max(n, 1) for lp, n in scores]
    elif normalize == "char":
        if candidates is None or len(candidates) != len(scores):
            raise ValueError("pick(normalize='char') needs candidates=<the candidate strings>, one per score.")
        values = [lp / max(len(c), 1) for (lp, _), c in zip(scores, candidates)]
    else:
        raise ValueError(f"unknown normalize={normalize!r}; use one of {NORMALIZATIONS}.")
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:  # strict: the first of equal values wins
            best = i
    return best


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _default_device(model) -> torch.device:
    dev = getattr(model, "device", None)  # PreTrainedModel and DeepSpeedEngine both have one
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    return next(model.parameters()).device


def _default_max_length(model) -> int | None:
    module = getattr(model, "module", model)  # unwrap a DeepSpeedEngine / DDP
    return getattr(getattr(module, "config", None), "max_position_embeddings", None)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int | None, add_eos: bool = False):
    """(context ids, continuation ids) as scored and as ``lomo_trainer.data`` trains them; see the module doc."""
    ctx = _ids(tokenizer, context, special=True)
    if not ctx:
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if fallback is None:
            raise ValueError("empty context and the tokenizer has no BOS/EOS token to condition on.")
        ctx = [fallback]
    cont = _ids(tokenizer, continuation, special=False)
    if not cont:
        raise ValueError(f"candidate {continuation!r} tokenises to nothing; drop it or give it text.")
    if add_eos and tokenizer.eos_token_id is not None:  # as data.py: EOS only where the tokenizer has one
        cont.append(tokenizer.eos_token_id)
    if max_length is not None:
        if len(cont) >= max_length:
            raise ValueError(f"candidate {continuation!r}: {len(cont)} continuation tokens do not fit "
                             f"max_length={max_length}; raise max_length or shorten the candidate.")
        ctx = keep_prompt_end(ctx, len(cont), max_length)
    return ctx, cont


def _build_items(tokenizer, requests, max_length, add_eos=False):
    """Flatten requests into (request, candidate, context ids, continuation ids)."""
    items = []
    for r, request in enumerate(requests):
        try:
            context, candidates = request
        except (TypeError, ValueError):
            raise ValueError(f"request {r} is not a (context, [candidates]) pair: {request!r}") from None
        if isinstance(candidates, str):
            raise ValueError(f"request {r}: candidates must be a list of strings, not the string {candidates!r}.")
        for c, cand in enumerate(candidates):
            try:
                ctx, cont = encode_pair(tokenizer, context, cand, max_length, add_eos)
            except ValueError as e:
                raise ValueError(f"request {r} candidate {c}: {e}") from None
            items.append((r, c, ctx, cont))
    return items


@torch.no_grad()
def _score_batch(model, batch, device, pad_id, extra):
    """Summed log-probs of each item's continuation; ``batch`` holds (ctx ids, cont ids) pairs."""
    inputs = [ctx + cont[:-1] for ctx, cont in batch]  # the last token is predicted, never input
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, x in enumerate(inputs):  # right padding: causal attention keeps pads out of real positions
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)
    logits = out.logits if hasattr(out, "logits") else out[0]
    results = []
    for i, (ctx, cont) in enumerate(batch):
        # logits at position t predict token t + 1: continuation token j sits at len(ctx) + j
        start = len(ctx) - 1
        logp = torch.log_softmax(logits[i, start:start + len(cont)].float(), dim=-1)
        target = torch.tensor(cont, device=logp.device).unsqueeze(-1)
        results.append(logp.gather(-1, target).double().sum().item())
    return results


def score_candidates(model, tokenizer, requests, *, batch_size: int = 8, max_length: int | None = None,
                     device=None, group=None, add_eos: bool = False) -> list[list[tuple[float, int]]]:
    """Score every continuation of every request; see the module docstring."""
    max_length = max_length if max_length is not None else _default_max_length(model)
    requests = list(requests)
    items = _build_items(tokenizer, requests, max_length, add_eos)
    logprob = score_pairs(model, [(ctx, cont) for _, _, ctx, cont in items], pad_id=tokenizer.pad_token_id,
                          batch_size=batch_size, device=device, group=group)
    results: list[list[tuple[float, int]]] = [[] for _ in requests]
    for i, (r, _, _, cont) in enumerate(items):  # items are in (request, candidate) order
        results[r].append((logprob[i], len(cont)))
    return results


_BETWEEN_BATCHES: ContextVar[Callable[[], None] | None] = ContextVar("between_batches", default=None)


@contextmanager
def between_batches(fn: Callable[[], None]):
    """Call ``fn()`` after every batch ``score_pairs`` scores while inside this block."""
    token = _BETWEEN_BATCHES.set(fn)
    try:
        yield
    finally:
        _BETWEEN_BATCHES.reset(token)


def score_pairs(model, pairs, *, pad_id=None, batch_size: int = 8, device=None, group=None) -> list[float]:
    """Summed log-likelihood of each ``(context ids, continuation ids)`` pair's continuation, distributed as
    ``score_candidates`` (every rank passes the same pairs). An empty continuation scores 0."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else _default_device(model)
    items = list(pairs)
    pad_id = pad_id if pad_id is not None else 0  # masked out: any id will do
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    rank = dist.get_rank(group) if distributed else 0
    if distributed:  # a rank with other requests would deadlock or silently mix results: fail loudly
        counts = torch.tensor([len(items), -len(items)], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        if counts[0].item() != -counts[1].item():
            raise ValueError("score_pairs: ranks passed different requests; every rank must pass the same list.")

    # Longest first (fewer pad tokens per batch), then a strided share per rank: deterministic on every rank.
    order = sorted(range(len(items)), key=lambda i: (-(len(items[i][0]) + len(items[i][1])), i))
    mine = order[rank::world]
    n_batches = math.ceil(len(mine) / batch_size)
    if distributed:
        t = torch.tensor([n_batches], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        n_batches = int(t.item())

    module = getattr(model, "module", model)
    extra = {"use_cache": False} if getattr(module, "config", None) is not None else {}
    was_training = model.training
    model.eval()  # dropout would make scores random
    between = _BETWEEN_BATCHES.get()
    try:
        local = []
        for b in range(n_batches):
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            if chunk:
                local.extend(_score_batch(model, [items[i] for i in chunk], device, pad_id, extra))
            else:  # dummy batch: keeps ZeRO-3's collective parameter gathers in step across ranks
                _score_batch(model, [([pad_id], [pad_id])], device, pad_id, extra)
            if between is not None:
                between()
    finally:
        model.train(was_training)

    logprob = [0.0] * len(items)
    if distributed:
        share = math.ceil(len(items) / world)  # every rank's share has this length or one less
        mine_t = torch.zeros(share, dtype=torch.float64, device=device)
        mine_t[:len(local)] = torch.tensor(local, dtype=torch.float64)
        gathered = [torch.empty_like(mine_t) for _ in range(world)]
        dist.all_gather(gathered, mine_t, group=group)
        for r in range(world):
            values = gathered[r].tolist()  # one device-to-host copy per rank, not one per item
            for j, i in enumerate(order[r::world]):
                logprob[i] = values[j]
    else:
        for j, i in enumerate(mine):
            logprob[i] = local[j]

    return logprob
