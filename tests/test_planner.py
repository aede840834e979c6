"""The planner's arithmetic against hand-computed figures, its monotonicity and its verdicts."""
import json

import pytest

from lomo_trainer.bench.inventory import build_inventory
from lomo_trainer.bench.planner import (Setup, ZeroKnobs, breakdown, format_plan, gathered_parameters, load_inventory,
                                        main, plan)
from lomo_trainer.bench.presets import PRESETS, load_config
from lomo_trainer.errors import ConfigError


def llama(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tie=False) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "tie_word_embeddings": tie}


# A small LLaMA whose every term is worked out by hand below.
SHAPE = build_inventory(llama(), name="hand")
# embed 64000 + 2 x (norms 128 + q 4096 + k 2048 + v 2048 + o 4096 + mlp 3 x 8192) + norm 64 + head 64000
N = 64000 + 2 * (128 + 4096 + 2048 + 2048 + 4096 + 24576) + 64 + 64000
KNOBS = ZeroKnobs(prefetch_bucket_size=10_000, max_live_parameters=10**9, param_persistence_threshold=1000,
                  reduce_bucket_size=50_000)


def setup(**kw):
    base = dict(gpus=2, gpu_mem_gb=24, seq_len=16, batch=2, dtype="bf16", device="cuda", fused_adamw=True, zero=KNOBS)
    base.update(kw)
    return Setup(**base)


def test_parameter_count_and_presets():
    assert SHAPE.n_params == N == 202_048
    assert load_inventory("7b").n_params == 6_738_415_616      # LLaMA-7B's published count
    assert load_inventory("65b").n_params == 65_285_660_672
    assert load_config("meta-llama/Llama-2-7b-hf")[0] == "7b"
    assert load_config("huggyllama/llama-65b")[0] == "65b"
    assert load_config("Qwen/Qwen3-30B-A3B")[0] == "qwen3-30b-a3b"
    assert load_config("meta-llama/Llama-3.1-8B-Instruct")[0] == "llama-3.1-8b"
    assert load_config("mistralai/Mistral-7B-v0.3")[0] == "mistral-7b"
    with pytest.raises(ConfigError, match="--model"):
        load_config("gpt2-xl")


def test_load_shape_from_config_json(tmp_path):
    cfg = llama()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_inventory(str(tmp_path / "config.json")).n_params == N
    assert load_inventory(str(tmp_path)).n_params == N
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no \"model_type\""):
        load_inventory(str(tmp_path))


def test_terms_by_hand():
    T = 32  # tokens
    # every parameter's shard: ceil(numel / 2); all sizes here are even except none
    shard = N // 2
    lomo = breakdown(SHAPE, setup(), "lomo")
    assert lomo["param_shards"] == 2 * shard
    assert lomo["persistent_params"] == 2 * (4 * 64 + 64)          # four layer norms + final norm, whole
    assert breakdown(SHAPE, setup(zero=ZeroKnobs(param_persistence_threshold=64)), "lomo")["persistent_params"] == \
        lomo["persistent_params"], "DeepSpeed keeps numel <= threshold"
    assert lomo["gathered_working_set"] == 2 * N  # within the reuse distance (1e9) of backward: all of it
    assert lomo["gradient_buffers"] == 0
    assert lomo["gradient_in_flight"] == 2 * 64000 + (2 + 8) * 32000
    assert lomo["optimizer_states"] == 0
    per_layer = 2 * (7 * 64 + 2 * 32 + 4 * 128) + 8 * 64 + 4 * 4       # = 2576 bytes per token per layer
    assert per_layer == 2576
    assert lomo["activations"] == per_layer * T * 2 + (4 * 64 + 4 * 64) * T
    assert lomo["loss_logits"] == 12 * 1000 * T
    head = 2 * 1000 * T + lomo["gradient_in_flight"]
    static = 2 * shard + 2 * 320
    assert lomo["total"] == static + 2 * N + lomo["activations"] + max(12 * 1000 * T, head)

    adamw = breakdown(SHAPE, setup(), "adamw")
    assert adamw["gradient_buffers"] == 2 * shard + 2 * 50_000         # bf16 partitions + reduce bucket
    assert adamw["optimizer_states"] == 12 * shard
    assert adamw["optimizer_step_temporaries"] == 4 * shard            # the fp32 gradient; fused AdamW adds none
    sgd = breakdown(SHAPE, setup(), "sgd")
    assert sgd["optimizer_states"] == 4 * shard
    assert sgd["optimizer_step_temporaries"] == 4 * shard
    assert breakdown(SHAPE, setup(device="cpu"), "adamw")["optimizer_step_temporaries"] == 8 * shard
    fwd = breakdown(SHAPE, setup(), "fwd")  # prefetched: all but the embedding; nothing saved: the logits dominate
    assert fwd["total"] == static + 2 * (N - 64000) + max(2 * (2 * 64 + 3 * 128) * T, (2 + 8) * 1000 * T)


def test_fp32_has_no_separate_master_and_cpu_bucket_is_what_is_written():
    s = setup(dtype="fp32", device="cpu")
    assert breakdown(SHAPE, s, "sgd")["optimizer_states"] == 0
    assert breakdown(SHAPE, s, "adamw")["optimizer_states"] == 8 * (N // 2)
    big_bucket = setup(device="cpu", zero=ZeroKnobs(reduce_bucket_size=10**9))
    assert breakdown(SHAPE, big_bucket, "sgd")["gradient_buffers"] == 2 * (N // 2) + 2 * N


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    T = 32
    act = breakdown(SHAPE, setup(activation_checkpointing=True), "lomo")["activations"]
    assert act == 2 * 64 * T * 2 + 2576 * T + (4 * 64 + 4 * 64) * T


@pytest.mark.parametrize("name", ["7b", "65b"])
def test_more_gpus_smaller_shards_and_order(name):
    shape = load_inventory(name)
    prev = None
    for gpus in (1, 2, 4, 8, 16):
        s = setup(gpus=gpus, seq_len=512, batch=1, activation_checkpointing=True, zero=ZeroKnobs())
        t = {m: breakdown(shape, s, m) for m in ("lomo", "sgd", "adamw")}
        assert t["lomo"]["total"] < t["sgd"]["total"] < t["adamw"]["total"]
        if prev is not None:
            assert t["lomo"]["param_shards"] < prev["lomo"]["param_shards"]
            assert all(t[m]["total"] < prev[m]["total"] for m in t)
        prev = t


def test_offload_zeroes_the_shard_term():
    s = setup(offload_param=True)
    assert breakdown(SHAPE, s, "lomo")["param_shards"] == 0
    assert breakdown(SHAPE, s, "lomo")["total"] < breakdown(SHAPE, setup(), "lomo")["total"]


def test_verdicts_65b_on_8x24gb():
    s = Setup(gpus=8, gpu_mem_gb=24, seq_len=512, batch=1, dtype="fp16", activation_checkpointing=True)
    p = plan(load_inventory("65b"), s)["modes"]
    assert p["lomo"]["fits"] and p["adalomo"]["fits"] and not p["sgd"]["fits"] and not p["adamw"]["fits"]
    assert not breakdown(load_inventory("65b"), Setup(gpus=8, gpu_mem_gb=16, seq_len=512, dtype="fp16",
                                                      activation_checkpointing=True), "lomo")["fits"]
    text = format_plan(load_inventory("65b"), s)
    assert text.count("verdict: fits") == 2 and text.count("verdict: does not fit") == 3  # lomo_accum neither


def test_accumulation_buffer_term_and_verdicts():
    """lomo_accum = LOMO + a buffer of this GPU's shards (4 B fp32, 2 B in the training dtype): 7B on 8 x 24 GB
    still fits, 65B does not, even with a 16-bit buffer."""
    s = Setup(gpus=8, gpu_mem_gb=24, seq_len=512, batch=2, dtype="fp16", activation_checkpointing=True)
    for accum, nbytes in (("fp32", 4), ("fp16", 2)):
        s2 = Setup(**{**s.__dict__, "accum_dtype": accum})
        for name, fits in (("7b", True), ("65b", False)):
            shape = load_inventory(name)
            t, lomo = breakdown(shape, s2, "lomo_accum"), breakdown(shape, s2, "lomo")
            n_shard = sum(-(-k // 8) for k in shape.numels)
            assert t["gradient_buffers"] == nbytes * n_shard and t["fits"] is fits, (name, accum)
            assert t["total"] >= lomo["total"] + nbytes * n_shard - lomo["gradient_in_flight"]
    assert breakdown(load_inventory("65b"), s, "lomo")["fits"]
    with pytest.raises(ValueError, match="accum_dtype"):
        Setup(dtype="fp16", accum_dtype="bf16")


def test_bad_input_names_the_flag(capsys):
    with pytest.raises(ValueError, match="dtype"):
        Setup(dtype="int8")
    with pytest.raises(SystemExit):
        main(["--model", "65b", "--gpus", "0"])
    assert "--gpus" in capsys.readouterr().err
    main(["--model", "7b", "--gpus", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["modes"]["lomo"]["fits"] in (True, False)


def test_ds_config_knobs_size_the_gathered_set(capsys):
    # the 65B configs' lowmem DeepSpeed JSON keeps 3e8 elements gathered instead of DeepSpeed's 1e9
    root = __file__.rsplit("/tests/", 1)[0]
    gathered = {}
    for name in ("zero3_fp16.json", "zero3_fp16_lowmem.json"):
        main(["--model", "65b", "--gpus", "8", "--batch", "2", "--activation-checkpointing", "--json",
              "--ds-config", f"{root}/configs/{name}"])
        gathered[name] = json.loads(capsys.readouterr().out)["modes"]["lomo"]["gathered_working_set"]
    assert gathered["zero3_fp16.json"] == 2 * 10**9
    assert gathered["zero3_fp16_lowmem.json"] == 2 * 3 * 10**8
    with pytest.raises(SystemExit):
        main(["--model", "65b", "--ds-config", "/nonexistent.json"])


# ---------------------------------------------------------------- the gathered working set against DeepSpeed
GATHER_CONFIG = llama(layers=4, kv_heads=4)
GATHER_SHAPE = build_inventory(GATHER_CONFIG, name="gather")
GATHER_KNOBS = [  # (max_live_parameters, prefetch_bucket_size, max_reuse_distance)
    (10**9, 0, 0),          # nothing kept: the LM head is released after forward
    (10**9, 0, 60_000),     # the reuse window holds the LM head only
    (10**9, 0, 150_000),    # ... and the last layer's MLP and norms
    (10**9, 5000, 0),       # the prefetcher alone: it ran ahead into backward and keeps all of it
    (10**9, 5000, 10**9),   # DeepSpeed's defaults: the whole model
]


@pytest.mark.multirank
def test_gathered_parameters_match_deepspeed():
    from distributed import run_ranks

    from lomo_trainer.bench.gather_probe import gathered_after_forward

    settings = [{"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": bucket,
                 "stage3_max_live_parameters": max_live, "stage3_max_reuse_distance": reuse}
                for max_live, bucket, reuse in GATHER_KNOBS]
    measured = run_ranks(gathered_after_forward, 2, GATHER_CONFIG, settings)[0]
    head = 64 * 1000
    for (max_live, bucket, reuse), got in zip(GATHER_KNOBS, measured):
        z = ZeroKnobs(prefetch_bucket_size=bucket, max_live_parameters=max_live, param_persistence_threshold=0,
                      max_reuse_distance=reuse)
        predicted = gathered_parameters(GATHER_SHAPE, z)
        # after forward DeepSpeed has let the LM head go; the planner counts it, gathered again for its backward.
        # The inventory's module order is registration order, which puts a layer's two norms (64 elements each)
        # after its projections; DeepSpeed's trace follows forward order: the two may differ by those norms.
        assert abs(max(got, head) - predicted) <= 2 * 64, (max_live, bucket, reuse, got, predicted)
    limited = ZeroKnobs(prefetch_bucket_size=5000, max_live_parameters=100_000, max_reuse_distance=0)
    assert gathered_parameters(GATHER_SHAPE, limited) == 100_000, "max_live_parameters bounds the prefetcher"
    assert measured[2] > measured[1] > measured[0] == 0, "the knobs must change what stays gathered"


def test_planner_is_torch_free_and_counts_lomos_update_slice():
    import subprocess
    import sys

    from lomo_trainer.bench import planner
    from lomo_trainer.optim.tensors import UPDATE_CHUNK

    assert planner.UPDATE_CHUNK == UPDATE_CHUNK
    code = "import sys, lomo_trainer.planner; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "the planner imported torch"


@pytest.mark.parametrize("tie", [False, True])
def test_adalomo_state_term_counts_rows_and_cols_of_the_real_model(tie):
    """rows + cols of every >=2-D parameter, and each rank's span of every vector, counted on the HF model."""
    import math

    from transformers import LlamaForCausalLM

    from lomo_trainer.bench.inventory import to_hf_config
    from lomo_trainer.bench.planner import adalomo_state_numel

    shape = build_inventory(llama(tie=tie))
    model = LlamaForCausalLM(to_hf_config(llama(tie=tie)))
    for gpus in (1, 3):
        want = sum(p.shape[0] + p.shape[1] if p.dim() == 2 else math.ceil(p.numel() / gpus)
                   for p in model.parameters())
        assert adalomo_state_numel(shape, gpus) == want
    s = Setup(gpus=2, gpu_mem_gb=24, seq_len=64, batch=1, dtype="bf16")
    ada, lomo = breakdown(shape, s, "adalomo"), breakdown(shape, s, "lomo")
    assert ada["optimizer_states"] == 4 * adalomo_state_numel(shape, 2) and lomo["optimizer_states"] == 0


def test_check_fits_is_the_start_up_check():
    """LOMOTrainer's check_memory (asked for only): the planner's verdict from the model's own config."""
    from lomo_trainer.bench.inventory import to_hf_config
    from lomo_trainer.bench.planner import check_fits

    def config(name):
        return to_hf_config(PRESETS[name])

    kw = dict(mode="lomo_accum", gpus=8, gpu_mem_bytes=24 * 10**9, seq_len=512, batch=2, dtype="fp16",
              activation_checkpointing=True)
    assert "predicted" in check_fits(config("7b"), **kw)
    with pytest.raises(ConfigError, match=r"^check_memory: lomo_accum on 8 x 22.4 GiB.* does not fit"):
        check_fits(config("65b"), **kw, accum_dtype="fp16")
    check_fits(config("65b"), **{**kw, "mode": "lomo"}, ds_config={"zero_optimization": {
        "stage": 3, "stage3_max_live_parameters": 1e8, "stage3_max_reuse_distance": 1e8, "reduce_bucket_size": "auto"}})
