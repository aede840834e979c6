"""AdaLomo (issue 13) on DeepSpeed ZeRO-3 (CPU, gloo) and on a plain module, against an independent float64
AdaLomo written here from the paper's equations (row/column *sums*, V = r c^T / 1^T r), sharing no code with
lomo_trainer. DeepSpeed's default persistence threshold is kept, as in test_lomo_zero3."""
import copy
import io
import os

import deepspeed
import pytest
import torch
from torch import nn

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.optim import AdaLomo
from models import DS_CONFIG, VOCAB, OddLM, allow_cpu_fp16, batch, reference_adalomo, tiny_llama
from reference import assert_close

STEPS = 3


class CubeLM(OddLM):
    """OddLM (5- and 1-element vectors, tied embeddings) plus a 2x3x5 tensor (a batch of two 3x5 matrices: on 4
    ranks each 8-element span covers partial rows and crosses the matrices' boundary) and a 1x3 matrix (on 4 ranks
    the last shard is all padding; on 3 each span is a partial row). Their gradients differ element by element,
    so a wrong row or column index shows."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.cube = nn.Parameter(torch.randn(2, 3, 5) * 0.3)
        self.tiny = nn.Parameter(torch.randn(1, 3) * 0.3)

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids)
        mixed = torch.einsum("bsk,ark->bsar", torch.tanh(h[..., :5] * 3), self.cube).flatten(2)  # (b, s, 6)
        h = torch.cat([h[..., :6] + mixed + h[..., :3].repeat(1, 1, 2) * self.tiny.repeat(1, 2), h[..., 6:]], -1)
        for block in self.blocks:
            h = h + block(h)
        h = self.norm(h) * (1 + self.gate.sum()) * self.temp
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        from transformers.modeling_outputs import CausalLMOutput
        return CausalLMOutput(loss=loss, logits=logits)


def build(kind):
    if kind == "llama":
        return tiny_llama(tie=True), VOCAB
    if kind == "llama_untied":
        return tiny_llama(tie=False), VOCAB
    return CubeLM(), 97


# ---------------------------------------------------------------- the independent reference
# ---------------------------------------------------------------- ZeRO-3 ranks
def train_zero3(rank, world, kind, opts, steps=STEPS, dtype=None, chunk=None, break_stats=False, fp16=None):
    if chunk is not None:  # forked rank: the parent keeps the default
        import lomo_trainer.optim.tensors
        lomo_trainer.optim.tensors.UPDATE_CHUNK = chunk
    if break_stats:  # mutation: the row/col (and sum theta^2) partial sums stay per rank, the rest is intact
        from lomo_trainer.optim import AdaLomoRule

        prepare = AdaLomoRule.prepare

        def partial_only(self, p, g, w, step):
            step.all_reduce = lambda p, t: None
            try:
                return prepare(self, p, g, w, step)
            finally:
                del step.all_reduce

        AdaLomoRule.prepare = partial_only
    if fp16:
        allow_cpu_fp16()
    model, vocab = build(kind)
    cfg = dict(DS_CONFIG)
    if dtype:
        cfg[dtype] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    opt = AdaLomo(engine, **opts)
    for step in range(steps):
        b = batch(step, rank, vocab)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        assert all(p.grad is None for p in engine.module.parameters()), "a gradient outlived its update"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def check_zero3(kind, world, opts, **kw):
    params = run_ranks(train_zero3, world, kind, opts, **kw)[0]
    model, vocab = build(kind)
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref_opts = {k: v for k, v in opts.items() if k != "clip_mode"}
    ref = reference_adalomo(model, STEPS, world, vocab, per_param=opts.get("clip_mode") == "per_param", **ref_opts)
    assert_close(params, ref, init)


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zero3_adalomo_matches_reference_tied_llama(world):
    check_zero3("llama", world, dict(lr=0.05, weight_decay=0.1))


@pytest.mark.multirank
@pytest.mark.parametrize("world", [3, 4])
def test_zero3_adalomo_padding_over_ranks_batched_matrices_clip_norm(world):
    # clip_threshold 0.5 binds (the update's RMS is ~1), so the grouped normalisation is exercised
    check_zero3("odd", world, dict(lr=0.05, weight_decay=0.01, clip_grad_norm=0.3, clip_threshold=0.5))


@pytest.mark.multirank
def test_zero3_adalomo_clip_value_and_slices():
    # slices of 7 elements: partial rows within one rank's span, the statistics summed piece by piece
    check_zero3("odd", 2, dict(lr=0.05, clip_grad_value=0.01, clip_threshold=0.5), chunk=7)


@pytest.mark.multirank
def test_zero3_adalomo_per_param_clipping():
    check_zero3("odd", 2, dict(lr=0.05, clip_grad_norm=0.05, clip_mode="per_param"))


@pytest.mark.multirank
def test_mutation_partial_statistics_without_all_reduce_fail():
    """Rows/cols (and the RMS sums) left per rank: the reference test above must see it."""
    with pytest.raises(AssertionError, match="off by"):
        check_zero3("llama", 2, dict(lr=0.05, weight_decay=0.1), break_stats=True)


@pytest.mark.multirank
def test_zero3_bf16_stochastic_rounding_bounded():
    opts = dict(lr=0.05, stochastic_rounding=True)
    params = run_ranks(train_zero3, 2, "llama", opts, dtype="bf16")[0]
    model, vocab = build("llama")
    model = model.to(torch.bfloat16).float()
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_adalomo(model, STEPS, 2, vocab, lr=0.05)
    for name, expected in ref.items():
        # Mean errors: AdaLomo's first step is sign-like on vectors (U = G / |G|), so an element whose tiny gradient
        # changes sign in bf16 moves the other way; on average the bf16 run must follow the float64 one.
        moved = (expected - init[name]).abs().mean().item()
        err = (params[name] - expected).abs().mean().item()
        assert err < 0.2 * moved, f"{name}: mean error {err:.2e}, mean move {moved:.2e}"


def train_fp16_overflow(rank, world):
    allow_cpu_fp16()
    model, vocab = build("llama")
    engine, *_ = deepspeed.initialize(model=model, config=dict(DS_CONFIG, fp16={"enabled": True}))
    fp16 = {"initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 100}
    opt = AdaLomo(engine, lr=0.05, fp16=fp16)
    params = list(engine.module.parameters())

    def snapshot():
        with deepspeed.zero.GatheredParameters(params):
            weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        return weights, {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}

    log = []
    for step in range(3):
        b = batch(step, rank, vocab)
        if step == 1:
            opt.loss_scaler.scale = 2.0 ** 40  # overflows every fp16 gradient
        if step == 2:
            opt.loss_scaler.scale = 2.0 ** 8
        before = snapshot()
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        after = snapshot()
        same_w = all(torch.equal(before[0][n], after[0][n]) for n in before[0])
        same_s = all(before[1][i].keys() == after[1][i].keys() and
                     all(torch.equal(before[1][i][k], after[1][i][k]) for k in before[1][i]) for i in before[1])
        log.append((opt.last_step_skipped, same_w, same_s, opt.loss_scale))
    return log


@pytest.mark.multirank
def test_zero3_fp16_overflow_changes_neither_weights_nor_second_moments():
    log = run_ranks(train_fp16_overflow, 2)
    assert log[0] == log[1], "ranks disagree"
    first, overflow, after = log[0]
    assert first[:3] == (False, False, False), "a finite step must move weights and state"
    assert overflow == (True, True, True, 2.0 ** 39), overflow
    assert after[:3] == (False, False, False)


# ---------------------------------------------------------------- one process
def test_plain_module_matches_reference_and_update_pass_overflow_keeps_state():
    model, vocab = build("odd")
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_adalomo(model, STEPS, 1, vocab, lr=0.05, weight_decay=0.1, clip_grad_norm=0.3)
    live = copy.deepcopy(model)
    opt = AdaLomo(live, lr=0.05, weight_decay=0.1, clip_grad_norm=0.3)
    for step in range(STEPS):
        b = batch(step, 0, vocab)
        opt.step(lambda: live(input_ids=b, labels=b).loss)
    assert_close({n: p.detach().double() for n, p in live.named_parameters()}, ref, init)

    # the update pass (not the norm pass) gives one parameter an infinite gradient (1e39 overflows fp32), or a finite
    # one whose square overflows (1e25: the update g / sqrt(inf) is a finite 0, the second moment is not), through
    # V (`temp`) and through the row/column factors (`tiny`): the parameter and its state stay as they were
    for overflows, (name, scale) in enumerate([("temp", 1e39), ("temp", 1e25), ("tiny", 1e25)], start=1):
        p = getattr(live, name)
        state = {k: v.clone() for k, v in opt.state[p].items()}
        weight = p.detach().clone()
        calls = []

        def closure():
            calls.append(1)
            loss = live(input_ids=b, labels=b).loss
            return loss + (scale * p.sum() if len(calls) == 2 else 0)

        opt.step(closure)
        assert torch.equal(p, weight) and all(torch.equal(opt.state[p][k], v) for k, v in state.items()), name
        assert not torch.equal(opt.state[live.gate]["v"], torch.zeros(5)), "the other parameters still update"
        opt.step(closure)
        assert opt.update_overflows == overflows


def train_resume(rank, world, split, steps=4):
    """Train ``steps`` steps; with ``split`` save after ``split`` steps, rebuild everything and load."""
    def make():
        model, vocab = build("llama")
        engine, *_ = deepspeed.initialize(model=model, config=dict(DS_CONFIG, bf16={"enabled": True}))
        return engine, AdaLomo(engine, lr=0.05, weight_decay=0.1, stochastic_rounding=True, clip_grad_norm=1.0,
                               seed=3), vocab

    engine, opt, vocab = make()
    for step in range(steps):
        if step == split:
            from lomo_trainer import _zero
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "shards": [p.ds_tensor.clone() for p in engine.module.parameters()],
                        "rng": torch.get_rng_state()}, buf)
            engine, opt, vocab = make()
            saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            for p, shard in zip(engine.module.parameters(), saved["shards"]):
                p.ds_tensor.copy_(shard)
            _zero.refresh_partitions(engine)
            opt.load_state_dict(saved["opt"])
            torch.set_rng_state(saved["rng"])
        b = batch(step, rank, vocab)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.multirank
def test_zero3_resume_is_bitwise_equal():
    straight = run_ranks(train_resume, 2, None)[0]
    resumed = run_ranks(train_resume, 2, 2)[0]
    for name, value in straight.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, resumed[name]), name


def test_state_dict_is_plain_and_keeps_fp32_state_for_bf16_weights():
    model = nn.Linear(4, 3).to(torch.bfloat16)
    opt = AdaLomo(model, lr=0.05)
    opt.step(lambda: model(torch.ones(2, 4, dtype=torch.bfloat16)).float().pow(2).sum())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    other = AdaLomo(model, lr=0.05)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert other.state[model.weight]["row"].dtype == torch.float32
    assert torch.equal(other.state[model.weight]["col"], opt.state[model.weight]["col"])
    assert other.param_groups[0]["decay_rate"] == -0.8


def test_is_a_lomo_and_rejects_bad_arguments():
    assert isinstance(AdaLomo(nn.Linear(2, 2)), LOMO)
    with pytest.raises(ValueError, match="decay_rate"):
        AdaLomo(nn.Linear(2, 2), decay_rate=0.5)
    with pytest.raises(ValueError, match="clip_threshold"):
        AdaLomo(nn.Linear(2, 2), clip_threshold=0)


# ---------------------------------------------------------------- side by side with lomo-optim
def test_side_by_side_with_lomo_optim():
    """lomo-optim's AdaLomo (what transformers' optim="adalomo" runs) on one process, same model and batches.
    lomo-optim is in the dev extras, so the suite runs this; without it the test is skipped."""
    lomo_optim = pytest.importorskip("lomo_optim")
    model = tiny_llama(tie=False)  # lomo-optim's tensor hooks update a tied weight from a partial gradient
    theirs_model = copy.deepcopy(model)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # lomo-optim puts its state on .cuda() unconditionally
    try:
        theirs = lomo_optim.AdaLomo(theirs_model, lr=0.05, weight_decay=0.1, loss_scale=0)
    finally:
        torch.Tensor.cuda = cuda
    ours = AdaLomo(model, lr=0.05, weight_decay=0.1)
    for step in range(STEPS):
        b = batch(step, 0, VOCAB)
        ours.step(lambda: model(input_ids=b, labels=b).loss)
        theirs.fused_backward(theirs_model(input_ids=b, labels=b).loss, 0.05)
    for (name, a), (_, b) in zip(model.named_parameters(), theirs_model.named_parameters()):
        err = (a - b).abs().max().item()
        # fp32 rounding only: the same equations, different order of operations (means vs our sums of partials)
        assert err <= 1e-5 * (1 + b.abs().max().item()), f"{name}: {err:.2e}"


def test_superglue_finetune_optimizer_adalomo_turns_the_lomo_block_into_adalomo():
    from lomo_trainer.config import validate
    from lomo_trainer.superglue.cli import build_parser
    from lomo_trainer.superglue.runconfig import run_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args, rest = build_parser().parse_known_args(["finetune", "--config", os.path.join(root, "configs", "superglue",
                                                  "tiny_cpu.json"), "--optimizer", "adalomo"])
    args.overrides = rest
    _, targs_kwargs, lomo = run_config(args, "lomo")
    assert lomo.optimizer == "adalomo" and targs_kwargs["deepspeed"]["optimizer"]["type"] == "AdaLomo"
    from transformers import TrainingArguments
    targs = TrainingArguments(**{k: v for k, v in targs_kwargs.items() if k != "deepspeed"})
    assert validate(targs_kwargs["deepspeed"], targs, lomo).optimizer == "adalomo"
