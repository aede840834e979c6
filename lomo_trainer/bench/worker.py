"""One benchmark mode on one rank: build the ZeRO-3 engine, run the steps, measure memory and time.

Modes (the same random-weight LLaMA, batch and sequence length in each):
  lomo     LOMO's fused update on a ZeRO-3 engine built without an optimizer (no norm clipping), each
           gradient's reduce-scatter overlapped with the rest of backward (``overlap_comm``)
  lomo_sync  the same with every reduce-scatter waited for inside its hook: what the overlap buys
  adalomo  AdaLomo on the same fused path (overlapped): factored second moment, two small all-reduces per parameter
  adamw    DeepSpeed's ZeRO-3 optimizer around torch.optim.AdamW: what the stock HF Trainer builds
  sgd      DeepSpeed's ZeRO-3 optimizer around torch.optim.SGD (no momentum)
  fwd_bwd  the floor: forward + backward on the engine without optimizer, each gradient dropped by a
           post-accumulate hook the moment it exists; no update and no gradient communication
  fwd      forward only under no_grad
"""
from __future__ import annotations

import statistics
import time

import torch

from .. import _zero
from .memstat import MemoryMeter

MODES = ("lomo", "lomo_sync", "adalomo", "adamw", "sgd", "fwd_bwd", "fwd")
LOMO_MODES = ("lomo", "lomo_sync", "adalomo")


def ds_config(mode: str, cfg: dict) -> dict:
    zero = {"stage": 3}
    if cfg.get("offload_param"):
        zero["offload_param"] = {"device": "cpu"}
    out = {"train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if cfg["dtype"] in ("fp16", "bf16"):
        out[cfg["dtype"]] = {"enabled": True}
    if mode in ("adamw", "sgd"):
        out["zero_allow_untested_optimizer"] = True  # torch's own optimizers: no compiled DeepSpeed op needed
        out["gradient_clipping"] = 0.0  # DeepSpeed's default is 1.0; LOMO runs here without clipping
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(mode: str, cfg: dict, device: torch.device):
    import deepspeed
    from transformers import LlamaForCausalLM

    from .llama_shapes import LlamaShape

    shape = LlamaShape(**cfg["shape"])
    hf_cfg = shape.to_hf_config(attn_implementation=cfg.get("attention", "sdpa"),
                                max_position_embeddings=max(cfg["seq_len"], 64))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
    ds_cfg = ds_config(mode, cfg)
    torch.manual_seed(cfg.get("seed", 0))
    # zero.Init partitions each module as it is built: a 7B model never exists whole on one device. The dtype
    # comes from the config's fp16/bf16 blocks: DeepSpeed 0.19.8's explicit ``dtype=`` path is
    # ``dtype or fp16 if fp16_supported else bf16`` (precedence), which gives bf16 for fp32 on most CPUs.
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = LlamaForCausalLM(hf_cfg)
    built = {p.dtype for p in model.parameters()}
    if built != {dtype}:
        raise RuntimeError(f"asked for {cfg['dtype']} parameters, zero.Init built {sorted(map(str, built))}")
    if cfg.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = None
    if mode == "adamw":
        kw = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0, **kw)
    elif mode == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
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
    params = [p for p in module.parameters() if p.requires_grad]
    seen_grad, previous = [0], [0]
    overlapped = mode in ("lomo", "adalomo") and torch.distributed.get_world_size() > 1

    def record(p):  # the gradient bytes alive at once: each is dropped (floor) or consumed (LOMO)
        if p.grad is not None:
            size = p.grad.numel() * p.grad.element_size()
            # with overlap the previous parameter's gradient is still being reduced when this one arrives
            seen_grad[0] = max(seen_grad[0], size + (previous[0] if overlapped else 0))
            previous[0] = size
        if mode == "fwd_bwd":
            p.grad = None

    if mode in LOMO_MODES or mode == "fwd_bwd":
        for p in params:  # registered before LOMO's hooks, so it sees each gradient first
            p.register_post_accumulate_grad_hook(record)
    lomo = None
    if mode in LOMO_MODES:
        from ..adalomo import AdaLomo
        from ..optimizer import LOMO

        cls = AdaLomo if mode == "adalomo" else LOMO
        lomo = cls(engine, lr=cfg["lr"], clip_grad_norm=None, overlap_comm=mode != "lomo_sync")

    vocab, B, S = cfg["shape"]["vocab"], cfg["batch"], cfg["seq_len"]
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, vocab, (B, S), generator=gen).to(device) for _ in range(2)]

    def step(x):
        previous[0] = 0  # the last backward drained its reductions
        if mode in LOMO_MODES:
            return lomo.step(lambda: module(input_ids=x, labels=x).loss)
        if mode in ("adamw", "sgd"):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            return loss
        if mode == "fwd_bwd":
            loss = module(input_ids=x, labels=x).loss
            with _zero.backward_allowed(engine):
                loss.backward()
            _zero.after_backward(engine)
            return loss
        with torch.no_grad():
            return module(input_ids=x, labels=x).loss

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
    timed = times[cfg["warmup"]:] or times
    return {"mode": mode, "rank": rank, "status": "ok", "baseline": baseline,
            "peak": peak["peak"] - baseline, "peak_reserved": peak["peak_reserved"],
            "resident_at_reset": resident - baseline, "file_backed_growth": meter.file_backed() - file_before,
            "params": pb, "optimizer": ob, "grad_in_flight_measured": seen_grad[0],
            "step_times": times, "median_step_s": statistics.median(timed), "losses": losses,
            "param_dtype": str(params[0].dtype).removeprefix("torch.")}
