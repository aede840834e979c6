"""Offline model presets as Hugging Face config dicts, and resolving ``--model`` to a config (no network).

Each preset is the architecture part of the model's published ``config.json`` (the values that decide parameter
shapes and activation sizes; token ids and generation settings left out). The planner and the benchmark build the
parameter inventory from these by instantiating the config on the meta device (``inventory.py``): nothing here
counts parameters by hand. Gemma-3 presets are the text model (``Gemma3ForCausalLM``); the published
checkpoints' ``text_config``.
"""
from __future__ import annotations

import json
import os
import re

from ..errors import ConfigError


def _llama1(hidden, intermediate, layers, heads, kv_heads=None, vocab=32000, **extra) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **extra}


def _llama3(hidden, intermediate, layers, heads) -> dict:
    return {"model_type": "llama", "vocab_size": 128256, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False}


def _qwen3(hidden, intermediate, layers, heads, kv_heads, tie=False, vocab=151936, **extra) -> dict:
    return {"model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": tie, **extra}


def _gemma3(hidden, intermediate, layers, heads, kv_heads, head_dim, query_pre_attn_scalar) -> dict:
    return {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "query_pre_attn_scalar": query_pre_attn_scalar,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True}


PRESETS: dict[str, dict] = {
    # The paper's LLaMA-1 sizes (its tables) and TinyLlama.
    "7b": _llama1(4096, 11008, 32, 32),
    "13b": _llama1(5120, 13824, 40, 40),
    "30b": _llama1(6656, 17920, 60, 52),     # LLaMA-33B ("30B")
    "65b": _llama1(8192, 22016, 80, 64),
    "1b": _llama1(2048, 5632, 22, 32, 4, rms_norm_eps=1e-5),  # TinyLlama-1.1B
    # Current families (published config.json values).
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32),
    "llama-3.1-70b": _llama3(8192, 28672, 80, 64),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8),
    "qwen3-30b-a3b": {**_qwen3(2048, 6144, 48, 32, 4), "model_type": "qwen3_moe", "moe_intermediate_size": 768,
                      "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "norm_topk_prob": True, "router_aux_loss_coef": 0.001},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                   "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False},  # v0.3
    "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, 256, 256),
    "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, 128, 168),
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                     "router_aux_loss_coef": 0.02, "tie_word_embeddings": False},
    # Random-weight models for tests and CPU benchmarks.
    "tiny": _llama1(64, 96, 2, 4, vocab=1600),
    "small": _llama1(512, 1376, 8, 8),
    "medium": _llama1(1024, 2752, 16, 16),   # ~270 M: parameters weigh more than in small
    # Qwen3's layout (q/k norms, head_dim 128 > hidden / heads), tied embeddings as in the small Qwen3 models.
    "qwen3-small": _qwen3(512, 1536, 8, 8, 4, tie=True, vocab=32000),
    # Qwen3-MoE's layout: 16 fused experts per layer, 4 per token.
    "qwen3-moe-small": {**_qwen3(512, 1536, 6, 8, 4, vocab=32000), "model_type": "qwen3_moe", "head_dim": 64,
                        "moe_intermediate_size": 384, "num_experts": 16, "num_experts_per_tok": 4,
                        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
}

# Hub names -> preset, matched on the name after the owner with these suffixes dropped.
_SUFFIXES = ("-instruct", "-hf", "-it", "-pt", "-base", "-v0.1", "-v0.2", "-v0.3", "-fp8")
_ALIASES = {"meta-llama-3.1-8b": "llama-3.1-8b", "meta-llama-3.1-70b": "llama-3.1-70b",
            "mixtral-8x7b-v0.1": "mixtral-8x7b", "tinyllama-1.1b-chat-v1.0": "1b",
            "tinyllama_v1.1": "1b", "qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b"}


def preset_for_hub_name(spec: str) -> str | None:
    """The preset a hub name stands for ("Qwen/Qwen3-8B" -> "qwen3-8b"), or None."""
    name = spec.lower().rsplit("/", 1)[-1]
    if name in _ALIASES:
        return _ALIASES[name]
    for _ in range(3):
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
    name = _ALIASES.get(name, name)
    if name in PRESETS:
        return name
    m = re.search(r"(?<![0-9.])(7|13|30|33|65)b(?![a-z0-9])", spec.lower())  # LLaMA-1 / Llama-2 sizes
    if "llama" in spec.lower() and m and not re.search(r"llama-?[3-9](?![0-9])", spec.lower()):
        return {"33": "30"}.get(m.group(1), m.group(1)) + "b"
    return None


def load_config(spec: str) -> tuple[str, dict]:
    """``--model``: a preset name, a hub name of a preset (no network), a config.json file or a local model folder.
    Returns (name, config dict with ``model_type``); ConfigError names the fix."""
    if spec.lower() in PRESETS:
        return spec.lower(), dict(PRESETS[spec.lower()])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {spec!r}: cannot read {path} ({e}); pass a valid config.json") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ConfigError(f"--model {spec!r}: {path} has no \"model_type\"; add the family "
                              "(e.g. \"model_type\": \"llama\")")
        return spec, cfg
    preset = preset_for_hub_name(spec)
    if preset is not None:
        return preset, dict(PRESETS[preset])
    raise ConfigError(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a hub name of one, or a local path; "
                      "pass a preset or a folder holding config.json")
