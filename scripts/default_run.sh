#!/usr/bin/env bash
# The default run: no GPU, no network, about 3 minutes on 2 CPU cores.
#
# Sets up .venv (scripts/setup.sh), then fine-tunes the tiny LLaMA-architecture model that ships with the
# project (lomo_trainer/assets/tiny-llama: 2 layers, hidden 64, random init, word-level tokenizer) on a
# synthetic sentiment task (lomo_trainer/assets/sentiment) with LOMO under DeepSpeed ZeRO-3 on 2 CPU
# processes (gloo), then ranks " positive" vs " negative" on 500 held-out reviews and prints the accuracy
# (chance: 0.50). Output: outputs/default_cpu/ (a from_pretrained folder, tensorboard logs under runs/).
#
# Variants: extra arguments override the run config, e.g.
#   bash scripts/default_run.sh --max_steps 50                 # a 20-second smoke run
#   bash scripts/default_run.sh --report_to wandb              # log to wandb (WANDB_MODE=offline works)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec .venv/bin/torchrun --standalone --nproc_per_node 2 -m lomo_trainer configs/default_cpu.json "$@"
