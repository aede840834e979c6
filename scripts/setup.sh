#!/usr/bin/env bash
# Creates .venv/ (or reuses it) and installs lomo_trainer with its dependencies.
# torch: an existing install (e.g. your CUDA build) is kept; with none, torch==2.13.0 is installed
# (the CUDA wheel from PyPI on a GPU machine). deepspeed builds as pure Python (DS_BUILD_OPS=0): LOMO needs
# none of its compiled ops. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.lomo_setup_$(sha1sum pyproject.toml | cut -c1-12)"
[ -f "$stamp" ] && exit 0
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# Pin whatever torch is now installed so no dependency can swap it for another build.
tv=$("$PY" -c "import torch; print(torch.__version__)")
echo "torch==$tv" > "$VENV/torch-constraint.txt"
export PIP_CONSTRAINT="$PWD/$VENV/torch-constraint.txt"
# deepspeed's setup.py imports torch: build it against the torch installed here, not a fresh one.
"$PY" -m pip show deepspeed >/dev/null 2>&1 || DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
"$PY" -m pip install -q -e ".[dev,bench,lora,trl]"
touch "$stamp"
