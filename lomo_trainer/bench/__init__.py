"""Benchmark and memory planner: tooling around the training core, never imported by it at import time.

- ``run``        ``python -m lomo_trainer.bench``: every mode in fresh processes, side by side, with the planner
- ``worker``     one mode on one rank (the mode table), ``report`` its figures, ``memstat`` peak memory
- ``planner``    per-GPU peaks term by term (``python -m lomo_trainer.planner``), torch-free arithmetic; ZeRO-3's
                 "auto" gathering limits come from the core (``lomo_trainer.gathering``)
- ``activations`` the activation and logit terms of any decoder, from the inventory's dimensions
- ``inventory``  any HF causal LM's parameters, from its config on the meta device (imports torch when building)
- ``presets``    offline config dicts (LLaMA-1, Llama-3.1, Qwen3, Qwen3-MoE, Mistral, Gemma-3, Mixtral, test sizes)
- ``gather_probe`` what ZeRO-3 keeps gathered (measured)

Nothing here imports torch at package import: the planner must stay arithmetic.
"""
