"""The benchmark's figures: per-mode summary, ratios, planner comparison, markdown table and bar chart."""
from __future__ import annotations

import json
import statistics

MIB = 2**20
FLOOR, BASE = "fwd_bwd", "adamw"


def _summarise(mode: str, ranks: list[dict], cfg: dict, pred: dict) -> dict:
    if any(r["status"] != "ok" for r in ranks):
        bad = next(r for r in ranks if r["status"] != "ok")
        return {"mode": mode, "status": bad["status"], "error": bad.get("error"),
                "planner_mib": pred["total"] / MIB}
    worst = max(ranks, key=lambda r: r["peak"] - r["resident_at_reset"])  # the breakdown of the rank with the highest peak
    pb, ob = worst["params"], worst["optimizer"]
    bucket = ob["reduce_bucket"]
    if cfg["device"] == "cpu":  # torch.empty: RSS counts only the pages the gradients were written to
        bucket = min(bucket, _full_grad_bytes(cfg))
    params = pb["param_shards"] + pb["persistent_params"]
    in_flight = worst["grad_in_flight_measured"] or (pb["largest_param"] if mode in ("adamw", "sgd") else 0)
    buffers = ob["grad_partitions"] + ob["fp32_grads"] + ob.get("lomo_buffer", 0)  # held between steps
    grads = buffers + bucket + in_flight
    opt = ob["master"] + ob["states"] + ob.get("lomo_states", 0)
    peak = worst["peak"]
    if cfg["device"] == "cpu":
        # RSS also holds allocator slack and framework memory that no GPU allocator statistic would count.
        # Tensor peak = the tensors alive between steps (measured sizes) + the growth of RSS within the timed
        # steps, less library code paged in meanwhile: the CPU stand-in for max_memory_allocated.
        held = params + buffers + bucket + opt
        peak = held + max(0, worst["peak"] - worst["resident_at_reset"] - worst["file_backed_growth"])
    step_s = max(r["median_step_s"] for r in ranks)
    tokens = cfg["batch"] * cfg["seq_len"]
    out = {"mode": mode, "status": "ok", "peak_mib": peak / MIB, "rss_peak_mib": worst["peak"] / MIB,
           "peak_reserved_mib": worst["peak_reserved"] / MIB if worst["peak_reserved"] else None,
           # what the device really holds: reserved + CUDA context and NCCL buffers (outside the allocator)
           "device_peak_mib": (worst["peak_reserved"] + (worst.get("cuda_context") or 0)) / MIB
           if worst["peak_reserved"] else None,
           "params_mib": params / MIB, "grads_mib": grads / MIB, "optimizer_states_mib": opt / MIB,
           "activations_mib": (peak - params - grads - opt) / MIB,
           "step_s": step_s, "tokens_per_s_per_device": tokens / step_s,
           "planner_mib": pred["total"] / MIB, "planner_peak_moment": pred["peak_moment"],
           "param_dtype": worst["param_dtype"], "losses_rank0": ranks[0]["losses"], "step_times_rank0": ranks[0]["step_times"],
           "raw": {"params": pb, "optimizer": ob, "grad_in_flight_measured": worst["grad_in_flight_measured"],
                   "baseline_bytes": worst["baseline"]}}
    out["planner_rel_err"] = (out["planner_mib"] - out["peak_mib"]) / out["peak_mib"]
    return out


def _full_grad_bytes(cfg: dict) -> int:
    return cfg["n_params"] * {"fp32": 4}.get(cfg["dtype"], 2)


def build(cfg: dict, results: dict, predictions: dict) -> dict:
    """``results[mode]``: one list of per-rank results per round. Memory from the first round (it repeats to
    within 0.5 MiB), step time the median over rounds."""
    rows = {}
    for m, rounds in results.items():
        rows[m] = _summarise(m, rounds[0], cfg, predictions[m])
        if rows[m]["status"] == "ok" and len(rounds) > 1:
            per_round = [max(r["median_step_s"] for r in ranks) for ranks in rounds
                         if all(r["status"] == "ok" for r in ranks)]
            rows[m]["step_s_rounds"] = per_round
            rows[m]["step_s"] = statistics.median(per_round)
            rows[m]["tokens_per_s_per_device"] = cfg["batch"] * cfg["seq_len"] / rows[m]["step_s"]
    floor, base = rows.get(FLOOR, {}), rows.get(BASE, {})
    for row in rows.values():
        if row["status"] != "ok":
            continue
        if floor.get("status") == "ok":
            row["peak_vs_floor"] = row["peak_mib"] / floor["peak_mib"]
            row["time_vs_floor"] = row["step_s"] / floor["step_s"]
        if base.get("status") == "ok":
            row["peak_vs_adamw"] = row["peak_mib"] / base["peak_mib"]
            row["throughput_vs_adamw"] = row["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
    return {"config": cfg, "n_params": cfg["n_params"], "rows": rows,
            "planner": {m: {k: v for k, v in p.items()} for m, p in predictions.items()},
            "notes": _notes(cfg)}


def _notes(cfg: dict) -> list[str]:
    cpu = cfg["device"] == "cpu"
    return [
        ("CPU: 'peak' is a tensor peak from RSS: the measured sizes of the tensors held between steps + the RSS "
         "growth within the timed steps (less library pages faulted in); 'RSS' is the raw peak RSS above the RSS "
         "before the model was built. Both are CPU figures, not GPU memory; rank with the largest step growth."
         if cpu else
         "Memory is torch.cuda.max_memory_allocated, max over ranks; 'reserved+context' adds to "
         "max_memory_reserved the CUDA context and NCCL buffers measured with mem_get_info at start, which a "
         "memory cap counts too (set_per_process_memory_fraction alone caps only the allocator)."),
        "params = this rank's ds_tensor shards + persistent (gathered) small parameters: measured.",
        "grads = DeepSpeed's gradient partitions + fp32 gradient buffer + reduce bucket (measured sizes"
        + ("; the bucket counted up to the gradient bytes written to it, as RSS sees it" if cpu else "")
        + ") + the largest gradient alive (measured by hook for lomo/fwd_bwd; its size for adamw/sgd).",
        "optimizer states = fp32 master (when not the weights themselves) + torch optimizer state: measured.",
        "activations = peak - params - grads - optimizer states: derived (includes the gathered working set, "
        "the loss's logits and framework buffers).",
        "fwd_bwd (the floor) runs the engine without optimizer; a post-accumulate hook drops each gradient.",
        "step time = median of the steps after warm-up (max over ranks; with --repeat, the median over rounds); "
        "tokens/s per device = batch*seq/step.",
    ]


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
    cfg = report["config"]
    head = (f"Model {cfg['model']} ({cfg['model_config'].get('model_type')}, {report['n_params'] / 1e6:.1f} M params, "
            "random weights), "
            f"{cfg['dtype']}, seq {cfg['seq_len']} x batch {cfg['batch']}, {cfg['world_size']} {cfg['device']} rank(s), "
            f"activation checkpointing {'on' if cfg['activation_checkpointing'] else 'off'}, "
            f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps"
            + (f", memory cap {cfg['memory_cap_gb']} GB" if cfg.get("memory_cap_gb") else "") + ".")
    if cfg["warmup"] == 0:
        head += (" No warm-up: the timed steps include the first, in which ZeRO-3 records its parameter trace; it "
                 "prefetches and keeps parameters gathered only from the second step on, so a later step's peak can "
                 "be higher (docs/benchmarks.md, \"7B on CPU\").")
    cols = ["mode", "peak MiB", "RSS MiB" if cfg["device"] == "cpu" else "reserved+context MiB", "params", "grads", "opt states", "activations*", "step s",
            "tok/s/dev", "peak/floor", "peak/adamw", "time/floor", "tok/s vs adamw", "planner MiB", "planner err"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m, r in report["rows"].items():
        if r["status"] != "ok":
            lines.append(f"| {m} | {r['status'].upper()} |" + " - |" * (len(cols) - 4) + f" {_f(r['planner_mib'])} | - |")
            continue
        lines.append("| " + " | ".join([
            m, _f(r["peak_mib"]), _f(r["rss_peak_mib"] if cfg["device"] == "cpu" else r["device_peak_mib"]), _f(r["params_mib"]), _f(r["grads_mib"]),
            _f(r["optimizer_states_mib"]), _f(r["activations_mib"]), _f(r["step_s"], "{:.3f}"),
            _f(r["tokens_per_s_per_device"], "{:.0f}"), _f(r.get("peak_vs_floor"), "{:.3f}"),
            _f(r.get("peak_vs_adamw"), "{:.3f}"), _f(r.get("time_vs_floor"), "{:.3f}"),
            _f(r.get("throughput_vs_adamw"), "{:.3f}"), _f(r["planner_mib"]),
            _f(100 * r["planner_rel_err"], "{:+.1f}%")]) + " |")
    lines += ["", "*derived. " + " ".join(report["notes"]), ""]
    if report.get("ratios"):
        lines += [f"Step-time ratios, modes interleaved over {cfg.get('repeat', 1)} round(s) in fresh processes "
                  "(per round: the ratio of the two modes' median step times):", "",
                  "| ratio | meaning | median | min | max | per round |", "|---|---|---|---|---|---|"]
        for name, r in report["ratios"].items():
            lines.append(f"| {name} | {r['meaning']} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
                         + ", ".join(f"{x:.3f}" for x in r["rounds"]) + " |")
        lines.append("")
    if cfg.get("zero"):
        lines += [f"zero_optimization overrides: `{json.dumps(cfg['zero'])}`", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"].values() if r["status"] == "ok"]
    names = [r["mode"] for r in rows]
    parts = [("params_mib", "parameters"), ("grads_mib", "gradients"), ("optimizer_states_mib", "optimizer states"),
             ("activations_mib", "activations (derived)")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        vals = [max(0.0, r[key]) for r in rows]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(names, [r["planner_mib"] for r in rows], marker="_", s=900, color="black", zorder=3, label="planner")
    ax.set_ylabel("peak MiB per device")
    ax.set_title("peak memory" + (" (CPU RSS)" if report["config"]["device"] == "cpu" else ""))
    ax.legend(fontsize=7)
    ax2.bar(names, [r["tokens_per_s_per_device"] for r in rows], color="tab:gray")
    ax2.set_ylabel("tokens/s per device")
    ax2.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
