"""Step time of two lomo_trainer trees side by side (e.g. before and after a change to the engine), one process,
one thread each, steps interleaved so that load on the machine hits both alike.

    python scripts/paired_engine_bench.py OLD_TREE NEW_TREE [--rounds 10] [--hidden 512] [--layers 8]

Each tree runs in its own child process (PYTHONPATH=tree) on the same random LLaMA-shaped model, fp32, seq 128 x
batch 1; per round each child takes one step of each mode, in rotated order. Modes: ``fwd_bwd`` (forward +
backward, gradients dropped by a hook: the floor), ``lomo`` (SGD, no clipping), ``adalomo``. Prints the median step
time per tree and mode and the ratios new/old and lomo/fwd_bwd.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from lomo_trainer import LOMO, AdaLomo
hidden, layers = int(sys.argv[1]), int(sys.argv[2])
cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
models, opts = {}, {}
for mode in ("fwd_bwd", "lomo", "adalomo"):
    torch.manual_seed(0)
    models[mode] = m = LlamaForCausalLM(cfg)
    if mode == "lomo":
        opts[mode] = LOMO(m, lr=1e-4)
    elif mode == "adalomo":
        opts[mode] = AdaLomo(m, lr=1e-4)
    else:
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
ids = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
import lomo_trainer
print("ready", lomo_trainer.__file__, flush=True)
for line in sys.stdin:
    mode = line.strip()
    m = models[mode]
    t = time.perf_counter()
    if mode == "fwd_bwd":
        m(input_ids=ids, labels=ids).loss.backward()
    else:
        opts[mode].step(lambda: m(input_ids=ids, labels=ids).loss)
    print(json.dumps(time.perf_counter() - t), flush=True)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    trees = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {name: subprocess.Popen([sys.executable, "-c", CHILD, str(a.hidden), str(a.layers)], text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tree,
                                    env={**env, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"})
             for name, tree in trees.items()}
    for name, p in procs.items():
        ready, where = p.stdout.readline().split()
        assert ready == "ready" and where.startswith(trees[name]), (name, where)  # each child runs its own tree
    jobs = [(t, m) for m in ("fwd_bwd", "lomo", "adalomo") for t in ("old", "new")]
    times = {job: [] for job in jobs}
    for r in range(a.rounds + 1):  # round 0 warms up (first-step allocations, lazy state)
        for t, m in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
            procs[t].stdin.write(m + "\n")
            procs[t].stdin.flush()
            dt = json.loads(procs[t].stdout.readline())
            if r:
                times[(t, m)].append(dt)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    med = {job: statistics.median(v) for job, v in times.items()}
    low = {job: min(v) for job, v in times.items()}  # the least disturbed step: robust when the machine is busy
    print(f"LLaMA-shaped, hidden {a.hidden}, {a.layers} layers, vocab 32000, fp32, seq 128 x batch 1, 1 thread, "
          f"{a.rounds} interleaved rounds; step seconds, median (min)")
    print("| mode | old | new | new/old median (min) |\n|---|---|---|---|")
    for m in ("fwd_bwd", "lomo", "adalomo"):
        o, n = ("old", m), ("new", m)
        print(f"| {m} | {med[o]:.3f} ({low[o]:.3f}) | {med[n]:.3f} ({low[n]:.3f}) | {med[n] / med[o]:.3f} "
              f"({low[n] / low[o]:.3f}) |")
    for t in ("old", "new"):
        print(f"{t}: lomo/fwd_bwd {med[(t, 'lomo')] / med[(t, 'fwd_bwd')]:.3f} ({low[(t, 'lomo')] / low[(t, 'fwd_bwd')]:.3f}),"
              f" adalomo/fwd_bwd {med[(t, 'adalomo')] / med[(t, 'fwd_bwd')]:.3f} "
              f"({low[(t, 'adalomo')] / low[(t, 'fwd_bwd')]:.3f})")


if __name__ == "__main__":
    main()
