"""The benchmark end to end on a tiny LLaMA (1 warm-up + 1 timed step per mode, one CPU rank).

Speed is never asserted: the figures only have to be present, self-consistent and written out.
"""
import json

import pytest

from lomo_trainer.bench import run as bench
from lomo_trainer.bench.worker import MODES


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--world-size", "1", "--device", "cpu", "--out", str(out)])
    return rep, out


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
        assert r["activations_mib"] > 0, "what the peak holds beyond the measured parts cannot be negative"
        assert len(r["step_times_rank0"]) == 2 and r["param_dtype"] == "bfloat16"


def data_n_params(out):
    return json.loads((out / "bench.json").read_text())["n_params"]


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


def test_fp32_bench_measures_fp32(tmp_path):
    """DeepSpeed's zero.Init(dtype=torch.float32) builds bf16 on CPUs without fp16 support: the bench must not."""
    rep = bench.main(["--preset", "tiny", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--world-size", "1", "--device", "cpu", "--dtype", "fp32", "--modes", "lomo,fwd_bwd",
                      "--out", str(tmp_path)])
    row = rep["rows"]["lomo"]
    assert row["param_dtype"] == "float32"
    assert row["params_mib"] >= rep["n_params"] * 4 / 2**20 * (1 - 1e-6)
