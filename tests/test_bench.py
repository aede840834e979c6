"""The benchmark end to end on a tiny LLaMA (1 warm-up + 1 timed step per mode, one CPU rank).

Speed is never asserted: the figures only have to be present, self-consistent and written out.
"""
import json

import pytest

from lomo_trainer import bench
from lomo_trainer.bench_worker import MODES


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
        parts = r["params_mib"] + r["grads_mib"] + r["optimizer_states_mib"] + r["activations_mib"]
        assert parts == pytest.approx(r["peak_mib"])
        assert len(r["step_times_rank0"]) == 2


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
