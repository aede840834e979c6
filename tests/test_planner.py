"""The planner's arithmetic against hand-computed figures, its monotonicity and its verdicts."""
import json

import pytest

from lomo_trainer.llama_shapes import PRESETS, LlamaShape, load_shape
from lomo_trainer.planner import Setup, ZeroKnobs, breakdown, format_plan, main, plan

# A small LLaMA whose every term is worked out by hand below.
SHAPE = LlamaShape("hand", vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
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
    assert PRESETS["7b"].n_params == 6_738_415_616      # LLaMA-7B's published count
    assert PRESETS["65b"].n_params == 65_285_660_672
    assert load_shape("meta-llama/Llama-2-7b-hf") == PRESETS["7b"]
    assert load_shape("huggyllama/llama-65b") == PRESETS["65b"]
    with pytest.raises(ValueError, match="--model"):
        load_shape("gpt2-xl")


def test_load_shape_from_config_json(tmp_path):
    cfg = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_shape(str(tmp_path / "config.json")).n_params == N
    assert load_shape(str(tmp_path)).n_params == N


def test_terms_by_hand():
    T = 32  # tokens
    # every parameter's shard: ceil(numel / 2); all sizes here are even except none
    shard = N // 2
    lomo = breakdown(SHAPE, setup(), "lomo")
    assert lomo["param_shards"] == 2 * shard
    assert lomo["persistent_params"] == 2 * (4 * 64 + 64)          # four layer norms + final norm, whole
    assert lomo["gathered_working_set"] == 2 * (64000 + 64000 + 10_000)  # embedding + LM head + prefetch
    assert lomo["gradient_buffers"] == 0
    assert lomo["gradient_in_flight"] == 2 * 64000 + (2 + 8) * 32000
    assert lomo["optimizer_states"] == 0
    per_layer = 2 * (7 * 64 + 2 * 32 + 4 * 128) + 8 * 64 + 4 * 4       # = 2576 bytes per token per layer
    assert per_layer == 2576
    assert lomo["activations"] == per_layer * T * 2 + (4 * 64 + 4 * 64) * T
    assert lomo["loss_logits"] == 12 * 1000 * T
    head = 2 * 1000 * T + lomo["gradient_in_flight"]
    static = 2 * shard + 2 * 320
    assert lomo["total"] == static + 2 * 138000 + lomo["activations"] + max(12 * 1000 * T, head)

    adamw = breakdown(SHAPE, setup(), "adamw")
    assert adamw["gradient_buffers"] == 2 * shard + 2 * 50_000         # bf16 partitions + reduce bucket
    assert adamw["optimizer_states"] == 12 * shard
    assert adamw["optimizer_step_temporaries"] == 4 * shard            # the fp32 gradient; fused AdamW adds none
    sgd = breakdown(SHAPE, setup(), "sgd")
    assert sgd["optimizer_states"] == 4 * shard
    assert sgd["optimizer_step_temporaries"] == 4 * shard
    assert breakdown(SHAPE, setup(device="cpu"), "adamw")["optimizer_step_temporaries"] == 8 * shard
    fwd = breakdown(SHAPE, setup(), "fwd")  # no prefetch, nothing saved: the loss's logits dominate
    assert fwd["total"] == static + 2 * 128000 + max(2 * (2 * 64 + 3 * 128) * T, (2 + 8) * 1000 * T)


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
    shape = PRESETS[name]
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
    p = plan(PRESETS["65b"], s)["modes"]
    assert p["lomo"]["fits"] and not p["sgd"]["fits"] and not p["adamw"]["fits"]
    assert not breakdown(PRESETS["65b"], Setup(gpus=8, gpu_mem_gb=16, seq_len=512, dtype="fp16",
                                               activation_checkpointing=True), "lomo")["fits"]
    text = format_plan(PRESETS["65b"], s)
    assert text.count("verdict: fits") == 1 and text.count("verdict: does not fit") == 2


def test_bad_input_names_the_flag(capsys):
    with pytest.raises(ValueError, match="dtype"):
        Setup(dtype="int8")
    with pytest.raises(SystemExit):
        main(["--model", "65b", "--gpus", "0"])
    assert "--gpus" in capsys.readouterr().err
    main(["--model", "7b", "--gpus", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["modes"]["lomo"]["fits"] in (True, False)
