"""One benchmark mode on one rank: build the ZeRO-3 engine, run the steps, measure memory and time.

Modes (the same random-weight model, batch and sequence length in each) are rows of ``MODES``: a new mode is
one ``Mode`` entry (its step, and a torch optimizer if DeepSpeed's ZeRO-3 optimizer is to wrap one).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import _zero
from .memstat import MemoryMeter


@dataclass(frozen=True)
class Mode:
    doc: str
    # make_step(engine, cfg, device) -> step(x) -> loss; called once the engine exists and the hooks are on
    make_step: Callable
    # DeepSpeed's ZeRO-3 optimizer around this torch optimizer (params, cfg, device) -> optimizer; None: none
    torch_optimizer: Callable | None = None
    # the hook measuring the gradient bytes alive at once; ``overlapped``: one reduction is pending meanwhile
    records_grads: bool = False
    overlapped: bool = False
    plan: str | None = None  # the planner's mode for its prediction (None: the same name)
    plan_accum_dtype: str | None = None  # the planner's buffer dtype for it: "train" (the training dtype), else fp32


def _loss(engine, x):  # forward through the bare module: the engine refuses a direct backward (_zero.py)
    return engine.module(input_ids=x, labels=x).loss


def _fused(kind: str, overlap: bool, accumulate: bool = False, clip: float | None = None,
           train_dtype_buffer: bool = False):
    """A fused mode; ``clip``: global-norm clipping at this threshold (two passes, or one with ``accumulate``);
    ``train_dtype_buffer``: the buffer in the weights' dtype (what clip_mode "auto" keeps), else fp32."""
    def make(engine, cfg, device):
        from ..optim import LOMO, AdaLomo

        extra = {"buffer_dtype": next(engine.module.parameters()).dtype} if train_dtype_buffer else {}
        opt = {"lomo": LOMO, "adalomo": AdaLomo}[kind](engine, lr=cfg["lr"], clip_grad_norm=clip, overlap_comm=overlap,
                                                       accumulate=accumulate, **extra)

        def step(x):
            return opt.step(lambda: _loss(engine, x))
        step.optimizer = opt  # its gradient buffer is counted among the held tensors
        return step
    return make


def _zero_optimizer_step(engine, cfg, device):
    def step(x):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step


def _backward_only(comm: bool):
    """forward + backward, each gradient dropped in its hook; with ``comm`` first reduce-scattered to this
    rank's shard as LOMO does (averaged, launched async, waited for at the next hook), never applied."""
    def make(engine, cfg, device):
        pending = []

        def drain():
            while pending:
                work, finish = pending.pop()
                work.wait()
                finish()

        def drop(p):
            grad, p.grad = p.grad, None
            if comm and _zero.group_world_size(p) > 1:
                drain()
                # ``finish`` is kept: it holds the (padded) input alive until the collective is done
                pending.append(_zero.reduce_to_shard(p, grad.div_(_zero.group_world_size(p)), async_op=True))

        for p in engine.module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(drop)

        def step(x):
            loss = _loss(engine, x)
            with _zero.backward_allowed(engine):
                loss.backward()
            drain()
            _zero.after_backward(engine)
            return loss
        return step
    return make


def _forward_only(engine, cfg, device):
    def step(x):
        with torch.no_grad():
            return _loss(engine, x)
    return step


def _adamw(params, cfg, device):
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))


def _sgd(params, cfg, device):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=0.0)


MODES: dict[str, Mode] = {
    "lomo": Mode("LOMO's fused update on a ZeRO-3 engine without optimizer (no norm clipping), each gradient's "
                 "reduce-scatter overlapped with the rest of backward", _fused("lomo", True), records_grads=True,
                 overlapped=True),
    "lomo_sync": Mode("the same, every reduce-scatter waited for inside its hook: what the overlap buys",
                      _fused("lomo", False), records_grads=True, plan="lomo"),
    "lomo_accum": Mode("LOMO with a gradient buffer (accumulate=True, fp32): each step one micro-step added to the "
                       "buffer, then the update from it: what accumulation (or buffered clipping) costs",
                       _fused("lomo", True, accumulate=True), records_grads=True, overlapped=True),
    "lomo_clip": Mode("LOMO with global-norm clipping at 1.0 in two passes (the paper's recipe, clip_mode "
                      "\"global\"): a norm pass (forward + backward), then the update pass", _fused("lomo", True, clip=1.0),
                      records_grads=True, overlapped=True, plan="lomo"),
    "lomo_clip_buffered": Mode("the same clipping in one pass (clip_mode \"buffered\", what \"auto\" takes where it "
                               "fits): each reduced shard into a buffer in the training dtype, the norm from the "
                               "buffer, then the update from it", _fused("lomo", True, True, clip=1.0,
                                                                         train_dtype_buffer=True),
                               records_grads=True, overlapped=True, plan="lomo_accum", plan_accum_dtype="train"),
    "adalomo": Mode("AdaLomo on the same fused path (overlapped): factored second moment, two small all-reduces "
                    "per parameter", _fused("adalomo", True), records_grads=True, overlapped=True),
    "adamw": Mode("DeepSpeed's ZeRO-3 optimizer around torch.optim.AdamW: what the stock HF Trainer builds",
                  _zero_optimizer_step, torch_optimizer=_adamw),
    "sgd": Mode("DeepSpeed's ZeRO-3 optimizer around torch.optim.SGD (no momentum)", _zero_optimizer_step,
                torch_optimizer=_sgd),
    "fwd_bwd_comm": Mode("forward + backward + each gradient's reduce-scatter as LOMO launches it, no update: "
                         "LOMO / this is the update's own cost", _backward_only(comm=True), records_grads=True,
                         overlapped=True),
    "fwd_bwd": Mode("the floor: forward + backward, each gradient dropped the moment it exists; no update, no "
                    "gradient communication", _backward_only(comm=False), records_grads=True),
    "fwd": Mode("forward only under no_grad", _forward_only),
}


def ds_config(mode: str, cfg: dict) -> dict:
    zero = {"stage": 3, **(cfg.get("zero") or {})}  # cfg["zero"]: overrides, "auto" already resolved (run.py)
    if cfg.get("offload_param"):
        zero["offload_param"] = {"device": "cpu"}
    out = {"train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if cfg["dtype"] in ("fp16", "bf16"):
        out[cfg["dtype"]] = {"enabled": True}
    if MODES[mode].torch_optimizer is not None:
        out["zero_allow_untested_optimizer"] = True  # torch's own optimizers: no compiled DeepSpeed op needed
        out["gradient_clipping"] = 0.0  # DeepSpeed's default is 1.0; LOMO runs here without clipping
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(mode: str, cfg: dict):
    """The random-weight model of ``cfg["model_config"]`` (any HF causal LM config dict), built under zero.Init: each
    module is partitioned as it is constructed, so a 7B model never exists whole on one rank (tests/test_bench.py
    checks a rank's bytes)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from .inventory import to_hf_config

    hf_cfg = to_hf_config({**cfg["model_config"], "attn_implementation": cfg.get("attention", "sdpa")})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
    torch.manual_seed(cfg.get("seed", 0))
    # The dtype comes from the config's fp16/bf16 blocks: DeepSpeed 0.19.8's explicit ``dtype=`` path is
    # ``dtype or fp16 if fp16_supported else bf16`` (precedence), which gives bf16 for fp32 on most CPUs.
    with deepspeed.zero.Init(config_dict_or_path=ds_config(mode, cfg)):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    built = {p.dtype for p in model.parameters()}
    if built != {dtype}:
        raise RuntimeError(f"asked for {cfg['dtype']} parameters, zero.Init built {sorted(map(str, built))}")
    return model


def _build(mode: str, cfg: dict, device: torch.device):
    import deepspeed

    model = build_model(mode, cfg)
    if cfg.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    make_opt = MODES[mode].torch_optimizer
    optimizer = make_opt(model.parameters(), cfg, device) if make_opt else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(mode, cfg))
    return engine


def run(mode: str, cfg: dict, rank: int, device: torch.device) -> dict:
    """Run ``mode``; return memory (bytes above the baseline taken before the model existed, peak over the
    steps after warm-up), the breakdown and step times. An out-of-memory error is returned as ``status: "oom"``."""
    meter = MemoryMeter(device)
    baseline = meter.current()
    try:
        return _run(mode, cfg, rank, device, meter, baseline)
    except torch.OutOfMemoryError as e:
        return {"mode": mode, "rank": rank, "status": "oom", "error": str(e).splitlines()[0]}


def _run(mode, cfg, rank, device, meter, baseline) -> dict:
    engine = _build(mode, cfg, device)
    module = engine.module
    spec = MODES[mode]
    params = [p for p in module.parameters() if p.requires_grad]
    seen_grad, previous = [0], [0]
    overlapped = spec.overlapped and dist.get_world_size() > 1

    def record(p):  # the gradient bytes alive at once: each is dropped (floor) or consumed (LOMO)
        if p.grad is not None:
            size = p.grad.numel() * p.grad.element_size()
            # with overlap the previous parameter's gradient is still being reduced when this one arrives
            seen_grad[0] = max(seen_grad[0], size + (previous[0] if overlapped else 0))
            previous[0] = size

    if spec.records_grads:
        for p in params:  # registered before the mode's own hooks, so it sees each gradient first
            p.register_post_accumulate_grad_hook(record)
    mode_step = spec.make_step(engine, cfg, device)

    vocab, B, S = module.get_input_embeddings().num_embeddings, cfg["batch"], cfg["seq_len"]
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, vocab, (B, S), generator=gen).to(device) for _ in range(2)]

    def step(x):
        previous[0] = 0  # the last backward drained its reductions
        return mode_step(x)

    times, losses = [], []

    def timed_step(x):
        _sync(device)
        t0 = time.perf_counter()
        loss = step(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float().item()))

    for i in range(cfg["warmup"]):
        timed_step(batches[i % 2])
    # Peaks over the timed steps, once lazily created state (AdamW's m and v, the reduce bucket's pages,
    # library code faulted in) exists: what every later step holds, not construction or first-use spikes.
    meter.reset()
    resident, file_before = meter.current(), meter.file_backed()
    for i in range(cfg["steps"]):
        timed_step(batches[i % 2])
    peak = meter.peak()
    pb = _zero.parameter_bytes(module)
    ob = _zero.optimizer_bytes(engine)
    fused = getattr(mode_step, "optimizer", None)
    ob["lomo_buffer"] = fused.buffer_bytes if fused is not None else 0  # LOMO's shard-sized gradient buffer
    ob["lomo_states"] = fused.state_bytes if fused is not None else 0  # AdaLomo's factors (allocated in warm-up)
    timed = times[cfg["warmup"]:] or times
    return {"mode": mode, "rank": rank, "status": "ok", "baseline": baseline,
            "peak": peak["peak"] - baseline, "peak_reserved": peak["peak_reserved"],
            "resident_at_reset": resident - baseline, "file_backed_growth": meter.file_backed() - file_before,
            "params": pb, "optimizer": ob, "grad_in_flight_measured": seen_grad[0],
            "step_times": times, "median_step_s": statistics.median(timed), "losses": losses,
            "param_dtype": str(params[0].dtype).removeprefix("torch.")}
