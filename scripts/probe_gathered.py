"""How many parameters DeepSpeed ZeRO-3 holds gathered right after forward, per zero_optimization setting.

    DS_ACCELERATOR=cpu python scripts/probe_gathered.py --preset medium \
        '{}' '{"stage3_max_reuse_distance": 0}' '{"stage3_max_reuse_distance": 1e8, "stage3_prefetch_bucket_size": 0}'

Two forked CPU ranks (gloo), bf16, random weights; three fwd+bwd steps, counted after the last forward (the
trace is complete from the second step on), next to the planner's ``gathered_parameters``. The figures in
docs/benchmarks.md ("What ZeRO-3 keeps gathered") come from this script.
"""
import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("settings", nargs="+", help="zero_optimization overrides, one JSON object each")
    args = ap.parse_args()
    settings = [json.loads(s) for s in args.settings]

    import deepspeed  # noqa: F401  (imported once; the forked ranks inherit it)

    from lomo_trainer import _zero
    from lomo_trainer.bench.gather_probe import gathered_after_forward
    from lomo_trainer.bench.planner import ZeroKnobs, gathered_parameters, load_inventory
    from lomo_trainer.bench.presets import load_config
    from lomo_trainer.local_ranks import run_ranks

    _zero.disable_cpu_shm_build()
    name, config = load_config(args.preset)
    inv = load_inventory(args.preset)
    counts = run_ranks(gathered_after_forward, 2, config, settings, args.seq_len, "bf16", timeout=1800)[0]
    print("| zero_optimization | gathered after forward | planner |\n|---|---|---|")
    for extra, got in zip(settings, counts):
        predicted = gathered_parameters(inv, ZeroKnobs.from_ds_config(extra))
        print(f"| `{json.dumps(extra)}` | {got / 1e6:.1f} M | {predicted / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
