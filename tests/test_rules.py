"""A new update rule, written against the public protocol only (lomo_trainer.optim.UpdateRule), runs in the fused
engine unchanged: normalised SGD, exact against its float64 reference on a plain module and on 2 ZeRO-3 ranks.

It uses both halves of the protocol: ``prepare`` launches the all-reduce of the shard's squared norm over the
parameter's partition group (the whole parameter's norm: each rank holds a slice), ``apply`` waits for it and
writes the new shard through the engine's guarded write."""
import deepspeed
import pytest

import reference
from distributed import run_ranks
from lomo_trainer.optim import LOMO, UpdateRule, chunks, to_weight_device
from models import DS_CONFIG, VOCAB, batch, tiny_llama

STEPS, LR = 3, 0.02


class NormalizedSGD(UpdateRule):
    """p <- p - lr g / ||g||: a step of length lr for every parameter."""

    def prepare(self, p, g, w, step):
        norm_sq = step.clipping.norm_sq(g, w)  # this rank's slice, unscaled
        return norm_sq, step.all_reduce(p, norm_sq)  # summed over the slices (async with overlap_comm)

    def apply(self, p, g, w, prepared, step):
        norm_sq, work = prepared
        if work is not None:
            work.wait()
        scale = step.group(p)["lr"] / (norm_sq.sqrt() + 1e-12)
        for gc, wc in chunks(g, w):
            gc = to_weight_device(step.clipping.grad32(gc), wc)
            step.write(wc, wc.float() - scale.to(wc.device) * gc)


def expected(world):
    loss = reference.rank_mean_loss(world, lambda s, r: batch(s, r, VOCAB))
    return reference.train(tiny_llama(), STEPS, loss, reference.normalized_sgd(LR))


def assert_matches(result, ref):
    init = {n: p.detach().double() for n, p in tiny_llama().named_parameters()}
    for name, want in ref.items():
        moved = (want - init[name]).abs().max().item()
        err = (result[name] - want).abs().max().item()
        assert moved > 1e-4, f"{name} hardly moved ({moved:.1e})"
        assert err <= 1e-5 * moved + 2e-7 * (1 + want.abs().max().item()), f"{name}: off by {err:.2e}"


def train_rule(rank, world, zero3, rule=None):
    model = tiny_llama()
    target = deepspeed.initialize(model=model, config=DS_CONFIG)[0] if zero3 else model
    module = target.module if zero3 else model
    opt = LOMO(target, lr=LR, rule=rule if rule is not None else NormalizedSGD())
    for step in range(STEPS):
        b = batch(step, rank, VOCAB)
        opt.step(lambda: module(input_ids=b, labels=b).loss)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=zero3):
        return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def test_new_rule_on_a_plain_module():
    assert_matches(train_rule(0, 1, zero3=False), expected(1))


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 3])
def test_new_rule_on_zero3_ranks(world):
    assert_matches(run_ranks(train_rule, world, True)[0], expected(world))


@pytest.mark.multirank
def test_mutation_norm_of_the_local_slice_only_fails():
    """Without the all-reduce each rank divides by its own slice's norm: the test above must see it."""
    class LocalNorm(NormalizedSGD):
        def prepare(self, p, g, w, step):
            return step.clipping.norm_sq(g, w), None

    with pytest.raises(AssertionError, match="off by"):
        assert_matches(run_ranks(train_rule, 2, True, LocalNorm())[0], expected(2))
