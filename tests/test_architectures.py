"""Beyond LLaMA: the parameter inventory against the real models of every preset family, the activation terms
against the bytes autograd saves, check_memory on any config, LOMO and AdaLomo under ZeRO-3 on Qwen3 (dense and
mixture-of-experts), Gemma-3 and GPT-2 against the float64 references, and SuperGLUE zero-shot on Gemma-3."""
import glob
import json
import os

import deepspeed
import pytest
import torch

from distributed import run_ranks
from lomo_trainer import LOMO
from lomo_trainer.optim import AdaLomo
from lomo_trainer.bench import activations as act
from lomo_trainer.bench.inventory import Inventory, build_inventory, from_model, to_hf_config
from lomo_trainer.bench.planner import adalomo_state_numel, check_fits, load_inventory
from lomo_trainer.bench.presets import PRESETS
from lomo_trainer.errors import ConfigError
from models import DS_CONFIG, VOCAB, batch, reference_adalomo, reference_sgd
from reference import assert_close, assert_weights_match

GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
FAMILIES = ["7b", "llama-3.1-8b", "qwen3-8b", "qwen3-30b-a3b", "mistral-7b", "gemma-3-12b", "mixtral-8x7b", "gpt2"]


def tiny(family: str, **extra) -> dict:
    """The preset's family at test size: same model_type and layout (explicit head_dim, experts, tied embeddings)."""
    if family == "gpt2":
        return {**GPT2, **extra}
    cfg = dict(PRESETS[family], vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if "head_dim" in cfg:
        cfg["head_dim"] = 32          # not hidden / heads (16), as Qwen3's 128 and Gemma-3-12B's 256 are not
    if "query_pre_attn_scalar" in cfg:
        cfg.update(query_pre_attn_scalar=32, sliding_window=4)
    for key in ("num_experts", "num_local_experts"):
        if key in cfg:
            cfg[key] = 4
    if "num_experts_per_tok" in cfg:
        cfg.update(num_experts_per_tok=2, moe_intermediate_size=32)
    return {**cfg, **extra}


# ---------------------------------------------------------------- the inventory
@pytest.mark.parametrize("family", FAMILIES)
def test_inventory_equals_the_real_model(family):
    """Names, shapes, order and count of the meta-device inventory against the model built for real on the CPU;
    tied weights once; the output embedding found; a JSON round trip loses nothing."""
    from transformers import AutoModelForCausalLM

    cfg = tiny(family)
    inv = build_inventory(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(to_hf_config(cfg))
    assert [(p.name, p.shape) for p in inv.params] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert inv.n_params == model.num_parameters() == sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert inv.tie_embeddings == tied == bool(cfg.get("tie_word_embeddings", True))
    head = dict(model.named_parameters())[inv.head]
    assert head is model.get_output_embeddings().weight
    assert inv.largest.numel == max(p.numel() for p in model.parameters())
    assert Inventory.from_dict(json.loads(json.dumps(inv.to_dict()))) == inv
    assert inv.dims.moe_layers == (2 if family in ("qwen3-30b-a3b", "mixtral-8x7b") else 0)


PUBLISHED = {  # parameter counts of the released checkpoints (model cards / safetensors index)
    "7b": 6_738_415_616, "65b": 65_285_660_672, "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496,
    "qwen3-8b": 8_190_735_360, "qwen3-32b": 32_762_123_264, "qwen3-30b-a3b": 30_532_122_624,
    "mistral-7b": 7_248_023_552, "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_reproduce_published_counts(name):
    assert load_inventory(name).n_params == PUBLISHED[name]


def test_full_size_moe_and_gemma_shapes():
    moe = load_inventory("qwen3-30b-a3b")
    assert moe.largest.numel == 402_653_184 and len(moe.largest.shape) == 3  # 128 x 1536 x 2048, fused experts
    assert (moe.dims.moe_layers, moe.dims.experts, moe.dims.experts_per_token, moe.dims.moe_intermediate) == \
        (48, 128, 8, 768)
    gemma = load_inventory("gemma-3-12b")
    q = next(p for p in gemma.params if p.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert q.shape == (16 * 256, 3840) and gemma.dims.q_dim == 4096 != gemma.dims.hidden  # head_dim 256
    assert gemma.tie_embeddings and gemma.dims.rms_norms == 4 and gemma.dims.head_norms


# ---------------------------------------------------------------- the activation terms
def saved_bytes(model, ids) -> int:
    """Bytes autograd holds for backward after forward (each storage once; parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(storages.values())


# Per family: how close the terms must come. Gemma-3's own RMSNorm keeps its normalised value in fp32, and its
# post-norms' outputs feed only the residual: an approximation (activations.norm_bytes says so).
TOLERANCE = {"gemma-3-12b": 0.15}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_terms_match_what_autograd_saves(family, dtype):
    """training_activations + the loss's saved fp32 log-probs (4 B x vocab per token) against the saved tensors of
    a real forward (SDPA attention, default expert kernel), 2 x 48 tokens; a small vocabulary, so that the layers'
    terms, not the loss's, make up most of the figure."""
    from transformers import AutoModelForCausalLM

    cfg = tiny(family, attn_implementation="sdpa", vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(to_hf_config(cfg)).to(dtype)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids)
    inv = build_inventory(cfg)
    d, tokens = torch.finfo(dtype).bits // 8, ids.numel()
    predicted = act.training_activations(inv.dims, d, tokens, checkpointing=False) + 4 * inv.dims.vocab * tokens
    assert abs(predicted - measured) <= TOLERANCE.get(family, 0.10) * measured, (predicted, measured)


# ---------------------------------------------------------------- check_memory on any architecture
@pytest.mark.parametrize("family", FAMILIES)
def test_check_memory_plans_every_family(family):
    line = check_fits(to_hf_config(tiny(family)), mode="lomo", gpus=2, gpu_mem_bytes=24 * 2**30, seq_len=64,
                      batch=2, dtype="bf16")
    assert "predicted" in line and "\n" not in line


def test_check_memory_refuses_only_what_it_cannot_read_in_one_line():
    from transformers import T5Config

    with pytest.raises(ConfigError, match=r"^check_memory: model config \(T5Config\): cannot instantiate") as e:
        check_fits(T5Config(d_model=32, num_layers=1, vocab_size=100), mode="lomo", gpus=1, gpu_mem_bytes=2**34,
                   seq_len=8, batch=1, dtype="bf16")
    assert "\n" not in str(e.value) and "check_memory false" in str(e.value)
    with pytest.raises(ConfigError, match="not one this transformers knows"):
        build_inventory({"model_type": "no-such-family", "hidden_size": 8})


def test_qwen3_30b_a3b_on_8x24gb_lomo_fits_adamw_does_not():
    """The issue's case: the old LLaMA arithmetic counted 2.9 B parameters and passed ZeRO-3 AdamW."""
    cfg = to_hf_config(PRESETS["qwen3-30b-a3b"])
    kw = dict(gpus=8, gpu_mem_bytes=24 * 2**30, seq_len=512, batch=1, dtype="bf16", activation_checkpointing=True)
    assert "predicted" in check_fits(cfg, mode="lomo", **kw)
    assert "predicted" in check_fits(cfg, mode="adalomo", **kw)
    with pytest.raises(ConfigError, match="does not fit"):
        check_fits(cfg, mode="adamw", **kw)


# ---------------------------------------------------------------- LOMO and AdaLomo under ZeRO-3
STEPS = 3
MODELS = {
    # Qwen3-MoE: 4 fused experts of 2 per token (3-D gate_up/down tensors), untied; eager experts for float64
    "qwen3_moe": tiny("qwen3-30b-a3b", attn_implementation="eager"),
    # Gemma-3: tied embeddings, head_dim 32 != 64 / 4, q/k norms, 4 norms per layer, a 4-token sliding window
    "gemma3": tiny("gemma-3-12b", attn_implementation="eager"),
    # Qwen3 dense: q/k norms, head_dim 32 != 64 / 4, grouped-query attention, untied
    "qwen3": tiny("qwen3-8b", attn_implementation="eager"),
    # GPT-2: Conv1D weights (transposed against nn.Linear), fused qkv, learned positions, biases, tied embeddings
    "gpt2": tiny("gpt2", attn_implementation="eager"),
}


def build(kind: str):
    from transformers import AutoModelForCausalLM

    cfg = to_hf_config(MODELS[kind])
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel: the reference needs eager
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), VOCAB


def train_zero3(rank, world, kind, optimizer, opts):
    model, vocab = build(kind)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    opt = {"lomo": LOMO, "adalomo": AdaLomo}[optimizer](engine, **opts)
    for step in range(STEPS):
        b = batch(step, rank, vocab)
        opt.step(lambda: engine.module(input_ids=b, labels=b).loss)
        assert all(p.grad is None for p in engine.module.parameters()), "a gradient outlived its update"
    inv = from_model(engine.module)  # full shapes from ds_shape
    persistent = sorted(n for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False))
    state = sum(v.numel() for p in engine.module.parameters() for k, v in opt.state[p].items() if k != "step")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    return params, inv.to_dict(), persistent, state


@pytest.mark.multirank
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_lomo_zero3_matches_float64_sgd(kind):
    opts = dict(lr=0.5, clip_grad_norm=1.0, weight_decay=0.01)
    params, inv, persistent, _ = run_ranks(train_zero3, 2, kind, "lomo", opts)[0]
    model, vocab = build(kind)
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_sgd(model, STEPS, 2, vocab, lr=0.5, weight_decay=0.01, clip_grad_norm=1.0)
    assert_weights_match(params, ref, init)
    # the planner's inventory is the partitioned model's, and it predicts DeepSpeed's persistent parameters
    planned = build_inventory(MODELS[kind])
    assert Inventory.from_dict(inv).params == planned.params
    assert sorted(p.name for p in planned.persistent(int(1e5))) == persistent and persistent


@pytest.mark.multirank
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_adalomo_zero3_matches_float64_reference(kind):
    """3-D expert tensors factored over their last two dimensions (one row/column statistic per expert matrix)."""
    opts = dict(lr=0.05, weight_decay=0.1)
    params, _, _, state = run_ranks(train_zero3, 2, kind, "adalomo", opts)[0]
    model, vocab = build(kind)
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference_adalomo(model, STEPS, 2, vocab, **opts)
    if kind == "gpt2":  # the key bias's true gradient is 0 (softmax ignores a shift shared by every key): AdaLomo
        # normalises fp32's rounding noise (~1e-11) to full-size steps of random sign; float64's (~1e-20) is below eps1
        for d in (params, ref, init):
            for n in [n for n in d if n.endswith("attn.c_attn.bias")]:
                d[n] = torch.cat([d[n][:64], d[n][128:]])  # the query and value thirds (hidden 64)
    assert_close(params, ref, init)
    assert state == adalomo_state_numel(build_inventory(MODELS[kind]), 2), "the planner's AdaLomo state term"


# ---------------------------------------------------------------- SuperGLUE zero-shot on Gemma-3
def zero_shot_recorded(rank, world, model_dir, data_dir, out):
    """zero-shot --model on CB, recording every (pair, log-likelihood) the ranking scored."""
    from lomo_trainer.superglue import evaluation
    from lomo_trainer.superglue.cli import main

    seen, score_pairs = [], evaluation.score_pairs

    def recorded(model, pairs, **kwargs):  # patched in this forked rank only
        logprob = score_pairs(model, pairs, **kwargs)
        seen.extend(zip(pairs, logprob))
        return logprob

    evaluation.score_pairs = recorded
    result = main(["zero-shot", "--model", model_dir, "--data-dir", data_dir, "--tasks", "cb,copa", "--n", "-1",
                   "--output-dir", out])
    return result, seen


@pytest.mark.multirank
def test_superglue_zero_shot_on_gemma3(tmp_path):
    """Batched, padded candidate scoring through the SuperGLUE CLI equals each pair scored alone, by hand."""
    from transformers import AutoModelForCausalLM

    from models import word_tokenizer

    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "superglue")

    def strings(x):
        if isinstance(x, str):
            yield x
        for v in x.values() if isinstance(x, dict) else x if isinstance(x, list) else ():
            yield from strings(v)

    words = sorted({w for f in glob.glob(os.path.join(fixtures, "*", "*.jsonl")) for line in open(f)
                    for text in strings(json.loads(line)) for w in text.split()})
    tokenizer, vocab = word_tokenizer(words)
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = to_hf_config(tiny("gemma-3-12b", vocab_size=len(vocab), max_position_embeddings=24,
                            attn_implementation="eager"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "model")
    (result, seen), = run_ranks(zero_shot_recorded, 1, str(tmp_path / "model"), fixtures, str(tmp_path / "out"))
    assert set(result["tasks"]) == {"cb", "copa"} and result["name"] == "model zero-shot"
    assert len(seen) > 10 and len({round(lp, 4) for _, lp in seen}) > 1
    model.eval()
    with torch.no_grad():
        for (ctx, cont), logprob in seen:
            ids = torch.tensor([list(ctx) + list(cont)])
            logits = model(input_ids=ids).logits[0].float().log_softmax(-1)
            by_hand = sum(logits[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            assert logprob == pytest.approx(by_hand, abs=1e-4), (ctx, cont)
