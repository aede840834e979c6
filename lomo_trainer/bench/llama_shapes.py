"""LLaMA model shapes: built-in presets, loading from a HF config, and parameter counts.

The planner and the benchmark both need the same shape arithmetic; there is no network here, so the
well-known sizes are written out (values from the published LLaMA / Llama-2 / TinyLlama configs).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LlamaShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie_embeddings: bool = False

    def __post_init__(self):
        for key in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model shape: {key} must be > 0, got {getattr(self, key)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"model shape: hidden ({self.hidden}) must divide by heads ({self.heads}) and heads by "
                             f"kv_heads ({self.kv_heads}); fix num_attention_heads / num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def param_shapes(self) -> list[tuple[str, int]]:
        """(name, numel) of every parameter, in module order (the order ZeRO-3 gathers them in forward)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out = [("embed_tokens", self.vocab * h)]
        for layer in range(self.layers):
            p = f"layers.{layer}."
            out += [(p + "input_layernorm", h), (p + "q_proj", h * h), (p + "k_proj", h * kv), (p + "v_proj", h * kv),
                    (p + "o_proj", h * h), (p + "post_attention_layernorm", h), (p + "gate_proj", h * i),
                    (p + "up_proj", h * i), (p + "down_proj", i * h)]
        out.append(("norm", h))
        if not self.tie_embeddings:
            out.append(("lm_head", self.vocab * h))
        return out

    @property
    def n_params(self) -> int:
        return sum(n for _, n in self.param_shapes())

    @property
    def largest_param(self) -> int:
        return max(n for _, n in self.param_shapes())

    def to_hf_config(self, **overrides):
        from transformers import LlamaConfig

        kw = dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                  num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                  tie_word_embeddings=self.tie_embeddings, max_position_embeddings=4096)
        kw.update(overrides)
        return LlamaConfig(**kw)

    def as_dict(self) -> dict:
        return dict(asdict(self), n_params=self.n_params)


PRESETS: dict[str, LlamaShape] = {
    # For tests and CPU runs: random weights, LLaMA layout, 32k vocabulary like the real ones.
    "tiny": LlamaShape("tiny", 1600, 64, 96, 2, 4, 4),
    "small": LlamaShape("small", 32000, 512, 1376, 8, 8, 8),
    "medium": LlamaShape("medium", 32000, 1024, 2752, 16, 16, 16),  # ~270 M: parameters weigh more than in small
    "1b": LlamaShape("1b", 32000, 2048, 5632, 22, 32, 4),       # TinyLlama-1.1B
    "7b": LlamaShape("7b", 32000, 4096, 11008, 32, 32, 32),     # LLaMA-7B / Llama-2-7b
    "13b": LlamaShape("13b", 32000, 5120, 13824, 40, 40, 40),   # LLaMA-13B / Llama-2-13b
    "30b": LlamaShape("30b", 32000, 6656, 17920, 60, 52, 52),   # LLaMA-33B ("30B")
    "65b": LlamaShape("65b", 32000, 8192, 22016, 80, 64, 64),   # LLaMA-65B
}


def from_hf_config(cfg, name: str = "hf") -> LlamaShape:
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if get(k) is None]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}: give a LLaMA-style config.json")
    heads = get("num_attention_heads")
    return LlamaShape(name, get("vocab_size"), get("hidden_size"), get("intermediate_size"),
                      get("num_hidden_layers"), heads, get("num_key_value_heads") or heads,
                      bool(get("tie_word_embeddings", False)))


def load_shape(spec: str) -> LlamaShape:
    """A preset name ("7b"), a hub name of a known LLaMA size ("meta-llama/Llama-2-7b-hf": mapped to its
    preset, since there is no network), a config.json file, or a local model folder (read with AutoConfig)."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if os.path.isfile(path):  # read directly: a bare LLaMA config.json needs no model_type for us
        with open(path) as f:
            return from_hf_config(json.load(f), name=spec)
    if os.path.isdir(spec):
        from transformers import AutoConfig

        return from_hf_config(AutoConfig.from_pretrained(spec, local_files_only=True), name=spec)
    m = re.search(r"(?<![0-9.])(7|13|30|33|65)b(?![a-z0-9])", spec.lower())
    if "llama" in spec.lower() and m:
        size = {"33": "30"}.get(m.group(1), m.group(1))
        return PRESETS[size + "b"]
    raise ValueError(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a known LLaMA hub name or a local "
                     "path; pass a preset or a folder holding config.json")


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else a


