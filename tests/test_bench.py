"""The benchmark end to end on a tiny LLaMA (1 warm-up + 1 timed step per mode, one CPU rank).

Speed is never asserted: the figures only have to be present, self-consistent and written out.
"""
import json

import pytest
import torch

from lomo_trainer.bench import run as bench
from lomo_trainer.bench.worker import MODES


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--world-size", "1", "--device", "cpu", "--out", str(out)])
    return rep, out


@pytest.mark.slow
def test_writes_md_json_png_with_all_modes(report):
    rep, out = report
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data["rows"]) == set(MODES)
    for mode in MODES:
        assert f"| {mode} |" in md
        assert data["rows"][mode]["status"] == "ok"
    assert "Command: `python -m lomo_trainer.bench" in md
    assert "No warm-up" not in md


@pytest.mark.slow
def test_ratios_recomputed_from_json(report):
    _, out = report
    rows = json.loads((out / "bench.json").read_text())["rows"]
    floor, adamw = rows["fwd_bwd"], rows["adamw"]
    for r in rows.values():
        assert r["peak_vs_floor"] == pytest.approx(r["peak_mib"] / floor["peak_mib"])
        assert r["peak_vs_adamw"] == pytest.approx(r["peak_mib"] / adamw["peak_mib"])
        assert r["time_vs_floor"] == pytest.approx(r["step_s"] / floor["step_s"])
        assert r["throughput_vs_adamw"] == pytest.approx(r["tokens_per_s_per_device"] / adamw["tokens_per_s_per_device"])
        assert r["tokens_per_s_per_device"] == pytest.approx(2 * 16 / r["step_s"])
        assert r["planner_rel_err"] == pytest.approx((r["planner_mib"] - r["peak_mib"]) / r["peak_mib"])
        # one rank holds every parameter: at least the model's bf16 bytes as the shape counts them (persistent
        # parameters' gathered copies come on top)
        assert r["params_mib"] >= data_n_params(out) * 2 / 2**20 * (1 - 1e-6)
        assert len(r["step_times_rank0"]) == 2 and r["param_dtype"] == "bfloat16"


def data_n_params(out):
    return json.loads((out / "bench.json").read_text())["n_params"]


@pytest.mark.slow
def test_breakdown_reflects_each_optimizer(report):
    rows = report[0]["rows"]
    assert rows["lomo"]["optimizer_states_mib"] == 0 and rows["fwd_bwd"]["optimizer_states_mib"] == 0
    # bf16 weights: SGD keeps an fp32 master (2x the bf16 shard bytes), AdamW adds m and v (3 x that)
    assert rows["sgd"]["optimizer_states_mib"] == pytest.approx(2 * rows["lomo"]["raw"]["params"]["param_shards"] / 2**20)
    assert rows["adamw"]["optimizer_states_mib"] == pytest.approx(3 * rows["sgd"]["optimizer_states_mib"])
    assert rows["fwd"]["grads_mib"] == 0
    # the largest gradient seen by the hook is the largest parameter (the 1600 x 64 embedding, bf16)
    assert rows["lomo"]["raw"]["grad_in_flight_measured"] == 1600 * 64 * 2
    assert all(r["planner_mib"] > 0 for r in rows.values())
    # lomo_accum holds an fp32 buffer of every (here: whole) parameter between steps: counted in grads (and so in the
    # held tensors under the CPU peak; the tiny model's RSS growth is too noisy to assert the peak itself)
    fp32_params = 4 * data_n_params(report[1])
    assert rows["lomo_accum"]["raw"]["optimizer"]["lomo_buffer"] == fp32_params
    assert rows["lomo_accum"]["grads_mib"] == pytest.approx(rows["lomo"]["grads_mib"] + fp32_params / 2**20, rel=1e-6)
    # AdaLomo's state, from the shapes: fp32 row and column sums of every matrix, fp32 V of every vector, and a
    # step count each; held between steps, so counted in the optimizer states (and the CPU peak's held tensors)
    from transformers import AutoModelForCausalLM

    from lomo_trainer.bench.inventory import to_hf_config
    from lomo_trainer.bench.presets import PRESETS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(to_hf_config(PRESETS["tiny"]))
    want = sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) + 4 for p in model.parameters())
    assert rows["adalomo"]["raw"]["optimizer"]["lomo_states"] == want
    assert rows["adalomo"]["optimizer_states_mib"] == pytest.approx(want / 2**20)


def test_bad_mode_is_named():
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "lomo,adam"])


def test_memory_cap_counts_the_cuda_context():
    from lomo_trainer.bench.run import memory_cap_fraction

    total, context = 80 * 2**30, 2**30  # an 80 GiB device whose context and NCCL buffers take 1 GiB
    assert memory_cap_fraction(24, total, context) * total + context == 24 * 2**30
    assert memory_cap_fraction(0.5, total, context) == 0.0


def test_device_column_adds_the_context_to_reserved():
    from lomo_trainer.bench.report import MIB, _summarise

    params = {"param_shards": 10 * MIB, "persistent_params": 0, "largest_param": MIB}
    opt = {"master": 0, "states": 0, "grad_partitions": 0, "fp32_grads": 0, "reduce_bucket": 0}
    rank = {"status": "ok", "peak": 100 * MIB, "resident_at_reset": 0, "params": params, "optimizer": opt,
            "grad_in_flight_measured": MIB, "peak_reserved": 120 * MIB, "cuda_context": 500 * MIB,
            "median_step_s": 1.0, "losses": [], "step_times": [], "baseline": 0, "param_dtype": "bfloat16"}
    row = _summarise("lomo", [rank], {"device": "cuda", "batch": 1, "seq_len": 8}, {"total": 100 * MIB,
                                                                                    "peak_moment": "x"})
    assert row["device_peak_mib"] == 620 and row["peak_mib"] == 100


@pytest.mark.slow
def test_fp32_bench_measures_fp32(tmp_path):
    """DeepSpeed's zero.Init(dtype=torch.float32) builds bf16 on CPUs without fp16 support: the bench must not."""
    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--world-size", "1", "--device", "cpu", "--dtype", "fp32", "--modes", "lomo,fwd_bwd",
                      "--out", str(tmp_path)])
    row = rep["rows"]["lomo"]
    assert row["param_dtype"] == "float32"
    assert row["params_mib"] >= rep["n_params"] * 4 / 2**20 * (1 - 1e-6)


# ---------------------------------------------------------------- on 2 ranks: construction and fwd_bwd_comm
# Big enough that building it whole shows in RSS (fp32: 42 MB, the largest parameter 8 MB).
PART_CONFIG = {"model_type": "llama", "vocab_size": 8000, "hidden_size": 256, "intermediate_size": 688,
               "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}


def _cfg(**kw):
    return dict({"model_config": PART_CONFIG, "seq_len": 16, "batch": 1, "dtype": "fp32", "lr": 1e-3}, **kw)


def _build_on_rank(rank, world):
    from lomo_trainer.bench.memstat import MemoryMeter, tune_malloc
    from lomo_trainer.bench.worker import build_model

    tune_malloc()
    import torch

    import gc

    from lomo_trainer.bench.presets import PRESETS

    # a first, tiny build pages in the code and imports of the path: only the model's own bytes are measured
    warm = build_model("lomo", _cfg(model_config=PRESETS["tiny"]))
    del warm
    gc.collect()
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.current()
    model = build_model("lomo", _cfg())
    held = sum(p.numel() * p.element_size() + p.ds_tensor.numel() * p.ds_tensor.element_size()
               for p in model.parameters())
    return {"held": held, "peak_growth": meter.peak()["peak"] - before,
            "partitioned": all(hasattr(p, "ds_tensor") for p in model.parameters())}


@pytest.mark.multirank
def test_model_is_built_partitioned_never_whole():
    """The 7B path's zero.Init: each rank holds half the bytes, and its RSS never grows by the whole model."""
    from distributed import run_ranks

    from lomo_trainer.bench.inventory import build_inventory

    inv = build_inventory(PART_CONFIG)
    full, largest = inv.n_params * 4, inv.largest.numel * 4
    for r in run_ranks(_build_on_rank, 2):
        assert r["partitioned"]
        assert r["held"] <= full / 2 + 64 * 1024, r  # the shard, plus padding of odd sizes
        # the shard plus one module being built (the largest, 8 MB, with slack): a whole build needs `full`
        assert r["peak_growth"] < r["held"] + 1.5 * largest < full, f"building grew RSS by {r['peak_growth']} B"


def _comm_on_rank(rank, world):
    import torch

    from lomo_trainer import _zero
    from lomo_trainer.bench import worker

    calls = []
    real = _zero.reduce_to_shard
    _zero.reduce_to_shard = lambda p, g, async_op=False: calls.append(p.ds_id) or real(p, g, async_op)
    engine = worker._build("fwd_bwd_comm", _cfg(), torch.device("cpu"))
    step = worker.MODES["fwd_bwd_comm"].make_step(engine, _cfg(), torch.device("cpu"))
    before = [p.ds_tensor.clone() for p in engine.module.parameters()]
    x = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(rank))
    step(x)
    step(x)
    params = list(engine.module.parameters())
    return {"calls": len(calls), "unique": len(set(calls)), "n": len(params),
            "grads_left": sum(p.grad is not None for p in params),
            "unchanged": all(torch.equal(b, p.ds_tensor) for b, p in zip(before, params))}


@pytest.mark.multirank
def test_fwd_bwd_comm_reduces_every_gradient_and_updates_nothing():
    from distributed import run_ranks

    for r in run_ranks(_comm_on_rank, 2):
        assert r["calls"] == 2 * r["n"] and r["unique"] == r["n"], r
        assert r["grads_left"] == 0 and r["unchanged"]


@pytest.mark.slow
def test_repeat_interleaves_rounds_and_reports_median_and_spread(tmp_path):
    import statistics

    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "0",
                      "--world-size", "1", "--device", "cpu", "--modes", "lomo,fwd_bwd_comm,sgd", "--repeat", "3",
                      "--out", str(tmp_path)])
    rows, ratios = rep["rows"], rep["ratios"]
    assert set(ratios) == {"lomo/fwd_bwd_comm", "lomo/sgd"}
    for name, r in ratios.items():
        a, b = name.split("/")
        want = [x / y for x, y in zip(rows[a]["step_s_rounds"], rows[b]["step_s_rounds"])]
        assert r["rounds"] == pytest.approx(want) and len(want) == 3
        assert r["median"] == pytest.approx(statistics.median(want))
        assert r["min"] == min(want) and r["max"] == max(want)
    for r in rows.values():
        assert r["step_s"] == pytest.approx(statistics.median(r["step_s_rounds"]))
    md = (tmp_path / "bench.md").read_text()
    assert "| lomo/fwd_bwd_comm |" in md
    assert "No warm-up: the timed steps include the first" in md  # its peak is below the steady state's


@pytest.mark.slow
def test_modes_the_planner_says_do_not_fit_are_not_run(tmp_path):
    from lomo_trainer.bench.presets import PRESETS

    cfg = {"model": "tiny", "model_config": PRESETS["tiny"], "world_size": 1,
           "seq_len": 16, "batch": 2, "dtype": "bf16", "activation_checkpointing": False, "offload_param": False,
           "device": "cpu", "zero": {}}
    plan = bench.predict(cfg)
    cap = (plan["lomo"]["total"] + plan["adamw"]["total"]) / 2 / 2**30  # LOMO fits, AdamW does not
    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "0",
                      "--world-size", "1", "--device", "cpu", "--modes", "lomo,adamw", "--memory-cap-gb", str(cap),
                      "--out", str(tmp_path)])
    assert rep["rows"]["lomo"]["status"] == "ok"
    assert rep["rows"]["adamw"]["status"] == "does not fit (planned)"
    assert rep["rows"]["adamw"]["planner_mib"] == pytest.approx(plan["adamw"]["total"] / 2**20)
