"""One-GPU check of the fused update. Not yet run on a GPU; its CPU path (``--device cpu``, plain module, fp32/bf16)
runs in tests/test_gpu_check.py.

On one GPU (world size 1, NCCL), for every optimizer mode (clipping global / per_param / value; fp32, fp16,
bf16, bf16 with stochastic rounding; ZeRO-3 with and without ``offload_param``; overlap on and off, which
is a no-op at world size 1 but exercises the flag), it
- runs one LOMO step on a tiny LLaMA and compares the weights with an independent CPU float64 SGD step
  (tolerance by precision);
- counts host synchronisations of that step under ``torch.cuda.set_sync_debug_mode("warn")`` (expected: 1
  per step; with offload, also one per parameter slice for the host copy);
- runs 200 fp16 steps and logs, per step, the global norm of the norm pass beside the norm of the gradients
  the update pass applied (they differ on GPU: the passes are not bit-identical), the scale and the skips.

    bash scripts/gpu_check.sh        # results under ${OUT:-outputs/gpu_check}

ZeRO-3 modes need deepspeed on the GPU machine (carry the wheels: shared/device/README.md); without it only
the plain-module modes run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

import torch

from lomo_trainer.optim import LOMO, SGD, chunks

VOCAB = 512
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bf16_sr": torch.bfloat16}
TOLERANCE = {"fp32": 2e-5, "fp16": 2e-2, "bf16": 5e-2, "bf16_sr": 5e-2}  # max error / (1 + max |w|)
CLIPS = {"global": dict(clip_grad_norm=0.5), "per_param": dict(clip_grad_norm=0.05, clip_mode="per_param"),
         "value": dict(clip_grad_value=2e-3)}


def modes(zero: bool):
    """(name, LOMO kwargs, precision, zero: None | 'zero3' | 'offload')."""
    out = []
    for clip, clip_opts in CLIPS.items():
        for precision in PRECISIONS:
            for overlap in (True, False):
                for z in ((None, "zero3", "offload") if zero else (None,)):
                    opts = dict(lr=0.5, overlap_comm=overlap, **clip_opts)
                    if precision == "fp16":
                        opts["fp16"] = {"initial_scale_power": 12}
                    if precision == "bf16_sr":
                        opts["stochastic_rounding"] = True
                    out.append((f"{clip}-{precision}-{'overlap' if overlap else 'no_overlap'}-{z or 'plain'}",
                                opts, precision, z))
    return out


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def make_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))


def reference_step(model, ids, lr, clip_grad_norm=None, clip_grad_value=None, clip_mode="global", **_):
    """One float64 SGD step on the CPU, from the definitions (no LOMO code): the expected weights by name."""
    model = copy.deepcopy(model).double().cpu()
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
    coef = 1.0
    if clip_grad_norm is not None and clip_mode == "global":
        coef = min(1.0, clip_grad_norm / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
    out = {}
    with torch.no_grad():
        for n, p, g in zip(names, params, grads):
            if clip_grad_value is not None:
                g = g.clamp(-clip_grad_value, clip_grad_value)
            if clip_grad_norm is not None and clip_mode == "per_param":
                g = g * min(1.0, clip_grad_norm / (g.norm().item() + 1e-6))
            out[n] = p - lr * coef * g
    return out


def relative_error(got: dict, expected: dict) -> float:
    return max(((got[n].double().cpu() - e).abs().max() / (1 + e.abs().max())).item() for n, e in expected.items())


class NormSGD(SGD):
    """LOMO's SGD rule that also sums, on the device, the squared norm of the gradients the update pass applies."""

    update_norm_sq: torch.Tensor | None = None

    def apply(self, p, g, w, prepared, step) -> None:
        for gc, _ in chunks(g, w):
            sq = step.clipping.grad32(gc).square().sum()
            self.update_norm_sq = sq if self.update_norm_sq is None else self.update_norm_sq + sq
        super().apply(p, g, w, prepared, step)


def _build(name_opts, precision, zero, device):
    """(optimizer, forward(ids) -> loss, gathered weights())."""
    opts = dict(name_opts)
    model = tiny_llama()
    dtype = PRECISIONS[precision]
    if zero is None:
        model = model.to(device=device, dtype=dtype)
        return LOMO(model, **opts), (lambda ids: model(input_ids=ids.to(device), labels=ids.to(device)).loss.float()), \
            (lambda: {n: p.detach() for n, p in model.named_parameters()})
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    if zero == "offload":
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    elif precision.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)

    def weights():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    return LOMO(engine, **opts), (lambda ids: engine.module(input_ids=ids.to(device), labels=ids.to(device)).loss.float()), weights


def count_syncs(fn) -> tuple[object, int]:
    """Run ``fn`` under CUDA's sync debug mode and count the synchronising calls it reports."""
    if not torch.cuda.is_available():
        return fn(), -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchroniz" in str(w.message) for w in caught)


def check_mode(name, opts, precision, zero, device) -> dict:
    ids = make_batch(0)
    ref = reference_step(tiny_llama().to(PRECISIONS[precision]).float(), ids, **opts)
    opt, forward, weights = _build(opts, precision, zero, device)
    opt.step(lambda: forward(ids))  # warm-up step outside the count: first-call allocations, lazy init
    opt, forward, weights = _build(opts, precision, zero, device)
    _, syncs = count_syncs(lambda: opt.step(lambda: forward(ids)))
    err = relative_error(weights(), ref)
    if opt.last_step_skipped:
        err = float("nan")
    return {"mode": name, "syncs": syncs, "rel_error": err, "tolerance": TOLERANCE[precision],
            "ok": bool(err <= TOLERANCE[precision]), "skipped": opt.skipped_steps}


def fp16_norms(device, steps: int = 200, zero=None) -> list[dict]:
    opts = dict(lr=0.05, clip_grad_norm=1.0, fp16={"initial_scale_power": 16, "loss_scale_window": 20})
    rule = NormSGD()
    opt, forward, _ = _build(dict(opts, rule=rule), "fp16", zero, device)
    log = []
    for step in range(steps):
        ids = make_batch(step)
        rule.update_norm_sq = None
        loss = opt.step(lambda: forward(ids))
        upd = rule.update_norm_sq
        log.append({"step": step, "loss": loss.item(), "scale": opt.loss_scale, "skipped": opt.last_step_skipped,
                    "skipped_steps": opt.skipped_steps, "norm_pass": opt.grad_norm,
                    "update_pass": None if upd is None else upd.sqrt().item()})
    return log


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", default="", help="run the modes whose name contains this")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    zero = args.device == "cuda" and _init_deepspeed()
    results = []
    for name, opts, precision, z in modes(zero):
        if args.only not in name or (args.device == "cpu" and precision == "fp16"):
            continue
        try:
            results.append(check_mode(name, opts, precision, z, args.device))
        except Exception as exc:  # report every mode, not just the first failure
            results.append({"mode": name, "ok": False, "error": repr(exc)})
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(args.out, "modes.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.device == "cuda":
        with open(os.path.join(args.out, "fp16_norms.jsonl"), "w") as f:
            for row in fp16_norms(args.device, args.steps, zero="zero3" if zero else None):
                f.write(json.dumps(row) + "\n")
    failed = [r["mode"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} modes ok" + (f"; failed: {failed}" if failed else ""))


def _init_deepspeed() -> bool:
    """World size 1 over NCCL, for the ZeRO-3 modes; False when deepspeed is not installed."""
    try:
        import deepspeed
    except ImportError:
        print("deepspeed not installed: plain-module modes only")
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed()
    return True


if __name__ == "__main__":
    main()
