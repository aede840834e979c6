"""The parameter inventory of any Hugging Face causal LM, read from the model itself (its config on the meta device).

``build_inventory(config)`` instantiates the config with ``torch.device("meta")`` (no memory, no network) and
records every parameter's name and shape in module order (registration order; tied tensors once, under the name
``named_parameters`` gives them), the groups of names that share one tensor, the output embedding (the LM head),
and the numbers the activation terms need (``Dims``). ``from_model`` reads the same from a live module, ZeRO-3
partitioned or not. No per-family arithmetic: a new architecture needs nothing here.

The ``Inventory`` itself is plain data (torch-free, JSON round-trip), so the planner's arithmetic stays torch-free.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from ..errors import ConfigError


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Dims:
    """What the activation terms need, per decoder layer, from the config and the inventory (see activations.py)."""
    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int              # the config's head_dim when present (Gemma-3-12B: 256), else hidden / heads
    intermediate: int = 0      # dense MLP width (0: every layer is MoE)
    gated_mlp: bool = True     # gate/up/down (SwiGLU, GeGLU) rather than fc/proj (GPT-2)
    act_extra: int = 0         # tensors of width intermediate an activation written as elementwise ops also saves
    rms_norms: int = 2         # norm modules of width hidden per layer without a bias (RMSNorm)
    layer_norms: int = 0       # ... with a bias (LayerNorm)
    head_norms: bool = False   # per-head q/k norms (Qwen3, Gemma-3)
    moe_layers: int = 0        # layers holding fused 3-D expert tensors
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0  # one expert's MLP width
    shared_intermediate: int = 0  # a shared expert's MLP width, in every MoE layer (0: none)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Inventory:
    name: str
    model_type: str
    params: tuple[Param, ...]
    head: str                                   # the output embedding's parameter (tied: the input embedding's name)
    dims: Dims
    tied: tuple[tuple[str, ...], ...] = field(default=())  # names reaching one tensor, the inventory's name first

    @property
    def n_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def numels(self) -> list[int]:
        return [p.numel for p in self.params]

    @property
    def largest(self) -> Param:
        return max(self.params, key=lambda p: p.numel)

    @property
    def head_numel(self) -> int:
        return next(p.numel for p in self.params if p.name == self.head)

    @property
    def tie_embeddings(self) -> bool:
        return any(self.head in group for group in self.tied)

    def module_numels(self) -> list[int]:
        """Elements per module, in module order: what ZeRO-3 gathers at once (a module's own parameters)."""
        out: list[int] = []
        last = None
        for p in self.params:
            if p.module == last:
                out[-1] += p.numel
            else:
                out.append(p.numel)
            last = p.module
        return out

    def persistent(self, threshold: int) -> list[Param]:
        """Parameters DeepSpeed keeps gathered for good: ``ds_numel <= stage3_param_persistence_threshold``."""
        return [p for p in self.params if p.numel <= threshold]

    def to_dict(self) -> dict:
        return {"name": self.name, "model_type": self.model_type, "head": self.head, "dims": asdict(self.dims),
                "params": [[p.name, list(p.shape)] for p in self.params], "tied": [list(g) for g in self.tied],
                "n_params": self.n_params}

    @classmethod
    def from_dict(cls, d: dict) -> "Inventory":
        return cls(d["name"], d["model_type"], tuple(Param(n, tuple(s)) for n, s in d["params"]), d["head"],
                   Dims(**d["dims"]), tuple(tuple(g) for g in d.get("tied", ())))


# ---------------------------------------------------------------- building it from a model
def to_hf_config(config):
    """A transformers config from a config dict (with ``model_type``) or a config object."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    d = dict(config)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model config: no \"model_type\"; add the family (e.g. \"model_type\": \"llama\")")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model config: model_type {model_type!r} is not one this transformers knows ({_line(e)}); "
                          "use a supported family or upgrade transformers") from None


def build_inventory(config, name: str | None = None) -> Inventory:
    """The inventory of ``config`` (a config dict with ``model_type`` or a transformers config), from
    ``AutoModelForCausalLM.from_config`` on the meta device. ConfigError when it cannot be built."""
    import json

    if isinstance(config, dict):
        return _cached(json.dumps(config, sort_keys=True), name)
    return _build(config, name)


@lru_cache(maxsize=32)
def _cached(config_json: str, name: str | None) -> Inventory:
    import json

    return _build(json.loads(config_json), name)


def _build(config, name: str | None) -> Inventory:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = to_hf_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # any failure to instantiate: the config cannot be planned
        raise ConfigError(f"model config ({type(cfg).__name__}): cannot instantiate it as a causal LM on the meta "
                          f"device ({_line(e)}); pass a config of a transformers causal LM") from None
    return from_model(model, cfg, name or getattr(cfg, "_name_or_path", None) or cfg.model_type)


def from_model(model, config=None, name: str = "model") -> Inventory:
    """The inventory of a live module (meta, CPU, or ZeRO-3-partitioned: full shapes from ``ds_shape``)."""
    config = config if config is not None else model.config
    seen: dict[int, int] = {}
    params, groups = [], []
    for pname, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            groups[seen[key]].append(pname)
            continue
        seen[key] = len(params)
        params.append(Param(pname, tuple(int(s) for s in (getattr(p, "ds_shape", None) or p.shape))))
        groups.append([pname])
    params = tuple(params)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = params[seen[id(out_emb.weight)]].name if out_emb is not None and id(out_emb.weight) in seen \
        else max(params, key=lambda q: q.numel).name
    tied = tuple(tuple(g) for g in groups if len(g) > 1)
    return Inventory(str(name), str(getattr(config, "model_type", "")), params, head,
                     read_dims(config, params, head), tied)


def read_dims(config, params: tuple[Param, ...], head: str) -> Dims:
    """Dims from the (text) config, and per-layer structure from the parameters of the decoder layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    get = lambda *keys: next((getattr(text, k) for k in keys if getattr(text, k, None) is not None), None)  # noqa: E731
    hidden, layers = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer")
    heads = get("num_attention_heads", "n_head")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads)) if not v]
    if missing:
        raise ConfigError(f"model config ({type(config).__name__}) lacks {missing}: cannot size its activations; "
                          "pass a decoder config that has them")
    kv_heads = get("num_key_value_heads", "multi_query_group_num") or heads
    head_dim = get("head_dim") or hidden // heads
    vocab = get("vocab_size") or next(p.shape[0] for p in params if p.name == head)
    blocks = _decoder_blocks(params, layers)
    moe = [b for b in blocks if any(len(p.shape) == 3 for p in b)]
    dense = [b for b in blocks if b not in moe]
    intermediate = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    experts = max((p.shape[0] for b in moe for p in b if len(p.shape) == 3), default=0)
    per_expert = sum(p.numel for p in moe[0] if len(p.shape) == 3) // experts if moe else 0
    first = blocks[0] if blocks else ()
    norms = _norm_modules(first, hidden)
    act_name = get("hidden_act", "hidden_activation", "activation_function")
    return Dims(hidden=hidden, layers=layers, vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                intermediate=intermediate if dense or not moe else 0,
                gated_mlp=_gated(dense[0], hidden, intermediate) if dense else True,
                act_extra=COMPOSITE_ACTIVATIONS.get(act_name, 0) if isinstance(act_name, str) else 0,
                rms_norms=sum(1 for has_bias in norms if not has_bias), layer_norms=sum(norms),
                head_norms=any(len(p.shape) == 1 and p.shape[0] == head_dim and p.shape[0] != hidden for p in first),
                moe_layers=len(moe), experts=experts,
                experts_per_token=(get("num_experts_per_tok", "moe_topk", "top_k") or 0) if moe else 0,
                moe_intermediate=per_expert // (3 * hidden) if moe else 0,  # gated experts: gate + up + down
                shared_intermediate=(get("shared_expert_intermediate_size") or 0) if moe else 0)


# Activations transformers writes as several elementwise ops: the extra width-i tensors autograd saves beyond the
# input. gelu_new (GPT-2): 0.5 x (1 + tanh(...)) saves tanh's output, 0.5 x and 1 + tanh. Fused ones (silu, gelu,
# gelu_pytorch_tanh, relu) save only their input.
COMPOSITE_ACTIVATIONS = {"gelu_new": 3}


def _decoder_blocks(params, layers: int) -> list[tuple[Param, ...]]:
    """The parameters of each decoder layer: the ModuleList with ``layers`` entries (the largest one otherwise)."""
    lists: dict[str, dict[int, list[Param]]] = {}
    for p in params:
        m = re.match(r"^(.*?)\.(\d+)\.", p.name)
        if m:
            lists.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(p)
    if not lists:
        return []
    prefix = next((k for k, v in lists.items() if len(v) == layers), max(lists, key=lambda k: len(lists[k])))
    return [tuple(ps) for _, ps in sorted(lists[prefix].items())]


def _norm_modules(block, hidden: int) -> list[bool]:
    """One entry per norm module of width ``hidden`` in ``block`` (modules holding only 1-D parameters of that
    width): True when it has a bias (LayerNorm)."""
    modules: dict[str, list[Param]] = {}
    for p in block:
        modules.setdefault(p.module, []).append(p)
    return [len(ps) > 1 for ps in modules.values() if all(len(p.shape) == 1 and p.shape[0] == hidden for p in ps)]


def _gated(block, hidden: int, intermediate: int) -> bool:
    """Gated when the block's matrices touching the intermediate width hold 3 (gate, up, down) x hidden x
    intermediate elements, not 2 (fc, proj)."""
    widths = {intermediate, 2 * intermediate}
    mlp = sum(p.numel for p in block if len(p.shape) == 2 and hidden in p.shape and widths & set(p.shape))
    return round(mlp / (hidden * intermediate)) >= 3


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]

