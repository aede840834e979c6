"""Byte counts read from DeepSpeed ZeRO-3 internals, for the benchmark's memory breakdown.

Kept apart from ``_zero.py`` (which serves the optimizer's hot path): nothing here changes state. Checked
against DeepSpeed 0.19.8: ``p.ds_tensor`` is a parameter's shard and ``p.ds_persist`` marks the small ones
that stay gathered; DeepSpeed's ZeRO-3 optimizer (``DeepSpeedZeroOptimizer_Stage3``) holds
``fp32_partitioned_groups_flat`` (the master copy, the weight buffer itself in fp32 training; its ``.grad``
is the fp32 gradient buffer), ``grad_partitions_flat_buffer`` (partitioned gradients) and ``ipg_buckets``
(the reduce bucket, ``reduce_bucket_size`` elements), and the wrapped torch optimizer's ``state``.
"""
from __future__ import annotations

import torch


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _unique(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _bytes(t)
    return total


def parameter_bytes(module: torch.nn.Module) -> dict:
    """This rank's shards, the persistent parameters held whole, and the largest full parameter."""
    shards = persistent = largest = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            shards += _bytes(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                persistent += p.ds_numel * p.element_size()
            largest = max(largest, p.ds_numel * p.element_size())
        else:
            shards += _bytes(p)
            largest = max(largest, _bytes(p))
    return {"param_shards": shards, "persistent_params": persistent, "largest_param": largest}


def optimizer_bytes(engine) -> dict:
    """Master copy, optimizer states and gradient buffers of DeepSpeed's ZeRO-3 optimizer (zeros for an
    engine built without one). ``reduce_bucket`` is the bucket's allocated size."""
    opt = engine.optimizer
    out = {"master": 0, "states": 0, "grad_partitions": 0, "fp32_grads": 0, "reduce_bucket": 0}
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return out
    weights = {t.data_ptr() for t in getattr(opt, "fp16_partitioned_groups_flat", []) if isinstance(t, torch.Tensor)}
    seen = set(weights)  # an fp32 run's master copy is the weight buffer: not counted twice
    out["master"] = _unique(opt.fp32_partitioned_groups_flat, seen)
    states = [v for s in opt.optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    out["states"] = _unique(states, seen)
    out["grad_partitions"] = _unique([getattr(opt, "grad_partitions_flat_buffer", None)], seen)
    out["fp32_grads"] = _unique([t.grad for t in opt.fp32_partitioned_groups_flat], seen)
    out["reduce_bucket"] = _unique([getattr(b, "buffer", None) for b in getattr(opt, "ipg_buckets", {}).values()], seen)
    return out
