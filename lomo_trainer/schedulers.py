"""DeepSpeed's scheduler blocks (WarmupLR, WarmupDecayLR, WarmupCosineLR), run by DeepSpeed's own classes.

``deepspeed.runtime.lr_schedules`` drives the ``param_groups`` of any ``torch.optim.Optimizer``, LOMO's included,
so the lr at each step is DeepSpeed's: set at construction (warmup_min_lr; 0 for the cosine schedule), then once
per ``step()`` after an update, as DeepSpeed's engine calls it. Only the "auto" values are filled here, from
TrainingArguments as HF does; ``config.validate`` has checked the block. ``state_dict()`` is
``{"last_batch_iteration": n}``: plain data, as weights_only checkpoint loading needs.
"""
from __future__ import annotations


def deepspeed_scheduler(block: dict, optimizer, num_training_steps: int, args):
    from deepspeed.runtime import lr_schedules

    kind = block["type"]
    params = {k: v for k, v in (block.get("params") or {}).items() if v != "auto"}
    # an absent warmup_num_steps is "auto" too (DeepSpeed's own default, 1000 steps, would surprise a short run);
    # DeepSpeed refuses 0 and warms up over at least 2 steps anyway
    params["warmup_num_steps"] = max(1, int(params.get("warmup_num_steps", args.get_warmup_steps(num_training_steps))))
    if kind != "WarmupLR":
        params.setdefault("total_num_steps", num_training_steps)
    if kind != "WarmupCosineLR":  # WarmupDecayLR's own default peak is 0.001, not the optimizer's lr
        # The block's lrs are the first group's (validate made warmup_max_lr its lr); another group (LoRA's
        # adapters) draws the same curve scaled to its own lr, as a torch LambdaLR would. The cosine schedule
        # works in ratios of each group's lr already.
        lrs = [g["lr"] for g in optimizer.param_groups]
        for key in ("warmup_min_lr", "warmup_max_lr"):
            value = params.get(key, lrs[0] if key == "warmup_max_lr" else None)
            if value is not None:
                params[key] = [value] + [value * lr / lrs[0] if lrs[0] else (lr if key == "warmup_max_lr" else value)
                                         for lr in lrs[1:]]
    return getattr(lr_schedules, kind)(optimizer, **params)
