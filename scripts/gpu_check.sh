#!/usr/bin/env bash
# NOT RUN YET (written without a GPU). One-GPU check of every LOMO optimizer mode against a CPU float64
# reference, host syncs counted per step, and norm-pass vs update-pass norms over 200 fp16 steps.
# See scripts/gpu_check.py. On the lent GPU machine, with the wheels carried (shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD:$PWD/.site
#   bash scripts/gpu_check.sh            # writes ${OUT:-outputs/gpu_check}/modes.json and fp16_norms.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/gpu_check.py --out "${OUT:-outputs/gpu_check}" "$@"
