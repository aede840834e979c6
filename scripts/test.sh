#!/usr/bin/env bash
# The test suite: sets up .venv (scripts/setup.sh) and runs pytest on CPU. A few minutes on two cores.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k zero3 -x`; the fast lane (no forked ranks, no
# whole-command runs, under a minute): `bash scripts/test.sh -m "not multirank and not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec .venv/bin/python -m pytest -q "$@"
