"""LOMO on a ZeRO-3 engine in a forked rank, and the comparison of its weights with the float64 SGD reference
(tests of the SGD rule under ZeRO-3 share them)."""
import deepspeed

from lomo_trainer import LOMO
from models import DS_CONFIG, VOCAB, OddLM, batch, reference_sgd, tiny_llama
from reference import assert_weights_match

STEPS = 3


def build(kind: str, checkpointing: bool = False):
    if kind == "llama":
        model = tiny_llama(tie=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, VOCAB
    if kind == "llama_untied":
        return tiny_llama(tie=False), VOCAB
    return OddLM(checkpointing=checkpointing), 97


def train_zero3(rank, world, kind, opts, checkpointing=False, via_engine=False, steps=STEPS, chunk=None, zero=None):
    if chunk is not None:  # forked rank: the parent keeps the default
        import lomo_trainer.optim.tensors

        lomo_trainer.optim.tensors.UPDATE_CHUNK = chunk
    model, vocab = build(kind, checkpointing)
    n_params = len(list(model.parameters()))
    cfg = dict(DS_CONFIG, zero_optimization={"stage": 3, **(zero or {})})
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    opt = LOMO(engine, **opts)
    forward = engine if via_engine else engine.module
    losses = []
    for step in range(steps):
        b = batch(step, rank, vocab)
        losses.append(opt.step(lambda: forward(input_ids=b, labels=b).loss).item())
        assert all(p.grad is None for p in engine.module.parameters()), "a gradient outlived its update"
        assert opt.hook_calls == n_params, f"{opt.hook_calls} hook calls for {n_params} parameters"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}, losses, opt.grad_norm


def assert_matches_reference(result, kind, world, opts, checkpointing=False, steps=STEPS):
    model, vocab = build(kind, checkpointing)
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_sgd(model, steps, world, vocab, lr=opts["lr"], weight_decay=opts.get("weight_decay", 0.0),
                        clip_grad_norm=opts.get("clip_grad_norm"), clip_grad_value=opts.get("clip_grad_value"),
                        per_param=opts.get("clip_mode") == "per_param")
    assert_weights_match(result, ref, init)
