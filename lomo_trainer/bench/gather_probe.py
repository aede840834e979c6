"""How many parameters DeepSpeed ZeRO-3 holds gathered right after forward, measured on a live engine.

The measurement behind the planner's gathered working set (``planner.gathered_parameters``), used by scripts/probe_gathered.py and
tests/test_planner.py."""
from __future__ import annotations

import torch

from .. import _zero
from .inventory import to_hf_config


def gathered_after_forward(rank: int, world: int, model_config: dict, settings: list[dict], seq_len: int = 16,
                           dtype: str = "fp32", steps: int = 3) -> list[int]:
    """For each ``zero_optimization`` override in ``settings``: build a random-weight model of ``model_config`` (a
    HF config dict) under
    ZeRO-3, run ``steps`` forward+backward passes (gradients dropped, no update) and return the elements
    gathered after the last forward. DeepSpeed's trace is complete from the second step on. One rank of
    ``run_ranks``: the process group is up."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    counts = []
    for extra in settings:
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **extra}}
        if dtype == "bf16":
            ds["bf16"] = {"enabled": True}
        with deepspeed.zero.Init(config_dict_or_path=ds, dtype=torch_dtype):
            model = AutoModelForCausalLM.from_config(to_hf_config(model_config))
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for step in range(steps):
            vocab = model.get_input_embeddings().num_embeddings
            x = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(step))
            loss = model(input_ids=x, labels=x).loss
            gathered = _zero.gathered_numel(model)
            with _zero.backward_allowed(engine):
                loss.backward()
            _zero.after_backward(engine)
        counts.append(gathered)
    return counts
