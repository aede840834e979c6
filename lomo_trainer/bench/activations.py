"""Activation and logit bytes of any HF decoder, from its ``Dims`` (inventory.py): the planner's memory terms.

Bytes saved for backward per token, ``d`` = bytes of the weight dtype (transformers 5.x, SDPA attention, which
saves no seq x seq matrix). Each term says what it counts and where it approximates.
"""
from __future__ import annotations

from .inventory import Dims


def norm_bytes(dims: Dims, d: int) -> int:
    """The norms of width hidden in one layer. RMSNorm (HF upcasts by hand): its fp32 input (4h, saved by pow and
    the multiply), the normalised value cast back (d h, saved by the weight multiply) and its output (d h, the next
    projection's saved input). LayerNorm: its input and output (2 d h; mean and rstd are per token). Approximation:
    a post-norm whose output only feeds the residual add (Gemma-3's post-attention/post-feedforward norms) saves no
    output, and Gemma's own RMSNorm keeps its normalised value in fp32: +-2 h bytes per norm."""
    h = dims.hidden
    return dims.rms_norms * (4 + 2 * d) * h + dims.layer_norms * 2 * d * h


def attention_bytes(dims: Dims, d: int) -> int:
    """q, k, v as SDPA saves them (after RoPE; d (q + 2 kv)), SDPA's output and the o-projection's contiguous input
    (2 d q), SDPA's log-sum-exp (4 B x heads); per-head q/k norms (Qwen3, Gemma-3) add their fp32 input and
    normalised value ((4 + d) (q + kv)). Approximation: attention biases, dropout masks (GPT-2's 0.1 defaults) and
    a materialised sliding-window mask are left out."""
    q, kv = dims.q_dim, dims.kv_dim
    out = d * (q + 2 * kv) + 2 * d * q + 4 * dims.heads
    if dims.head_norms:
        out += (4 + d) * (q + kv)
    return out


def dense_mlp_bytes(width: int, gated: bool, d: int, act_extra: int = 0) -> int:
    """Gated (SwiGLU/GeGLU): the gate's output (the activation's input), the activation's output, the up output and
    their product (the down projection's input): 4 d i. Not gated (fc, act, proj): 2 d i. An activation written as
    elementwise ops saves ``act_extra`` more of width i (GPT-2's gelu_new: 3; inventory.COMPOSITE_ACTIVATIONS)."""
    return ((4 if gated else 2) + act_extra) * d * width


def moe_bytes(dims: Dims, d: int) -> int:
    """One MoE layer, per token: the router's logits (d E) and their fp32 softmax (4 E); per routed copy (tokens x
    experts-per-token of them): the gathered hidden state (d h), the gate/up output (2 d i), the activation's
    output and the product (2 d i), the down output before the routing weight (d h), as both the eager and the
    grouped_mm kernels of transformers 5.x save them. A shared expert counts as a dense gated MLP."""
    routed = d * (2 * dims.hidden + 4 * dims.moe_intermediate)
    shared = dense_mlp_bytes(dims.shared_intermediate, True, d)
    return (d + 4) * dims.experts + dims.experts_per_token * routed + shared


def layer_bytes(dims: Dims, d: int, moe: bool) -> int:
    """Saved bytes per token of one decoder layer (dense or MoE)."""
    mlp = moe_bytes(dims, d) if moe else dense_mlp_bytes(dims.intermediate, dims.gated_mlp, d, dims.act_extra)
    return norm_bytes(dims, d) + attention_bytes(dims, d) + mlp


def final_norm_bytes(dims: Dims, d: int) -> int:
    """The final norm before the LM head, saved like a layer's RMSNorm."""
    return (4 + 2 * d) * dims.hidden


def training_activations(dims: Dims, d: int, tokens: int, checkpointing: bool) -> int:
    """Everything forward saves for backward, over all layers. With activation checkpointing: each layer's input
    (d h) plus one layer recomputed (the larger kind, dense or MoE)."""
    dense = dims.layers - dims.moe_layers
    per_layer = {False: layer_bytes(dims, d, False) if dense else 0,
                 True: layer_bytes(dims, d, True) if dims.moe_layers else 0}
    if checkpointing:
        saved = d * dims.hidden * dims.layers + max(per_layer.values())
    else:
        saved = dense * per_layer[False] + dims.moe_layers * per_layer[True]
    return (saved + final_norm_bytes(dims, d)) * tokens


def loss_bytes(dims: Dims, tokens: int) -> int:
    """The loss: logits upcast to fp32 for the cross entropy; its backward holds the saved log-probs, their gradient
    and the logits' gradient at once: 12 B x vocab per token."""
    return 12 * dims.vocab * tokens


def forward_bytes(dims: Dims, d: int, tokens: int) -> tuple[int, int]:
    """Forward under no_grad (nothing saved): (one layer's transients, the logits with their fp32 copy and
    log-probs). Transients: the hidden state twice and three MLP-wide tensors; MoE: per routed copy."""
    width = max(dims.intermediate, dims.experts_per_token * dims.moe_intermediate)
    layer = d * (2 * dims.hidden + 3 * width) * tokens
    logits = (d + 8 - (4 if d == 4 else 0)) * dims.vocab * tokens
    return layer, logits
