#!/usr/bin/env bash
# Full-parameter fine-tuning of LLaMA-7B..65B with LOMO on one machine of 8 x RTX 3090 (24 GB each).
#
# Hardware: 8 GPUs of 24 GB, CPU RAM >= 2 x the fp16 model size for loading (65B: ~260 GB; or use the
#           parameter-offload config and more RAM). Launcher: the deepspeed launcher, one process per GPU.
# Recipe (the paper's): fp16 with dynamic loss scaling, lr 0.03, global batch 16 (2 per GPU), 10 epochs,
#           linear schedule with 10% warmup, global-norm clipping at 1.0, activation checkpointing, ZeRO-3.
# Memory: LOMO keeps no optimizer state and no gradient buffer, so a GPU holds its 1/8 share of the fp16
#           weights + activations + the largest single gradient. The planner prints the arithmetic:
#             python -m lomo_trainer.planner --model 65b --gpus 8 --gpu-mem-gb 24 --activation-checkpointing
# Time: global-norm clipping (and fp16) needs the norm before the update: clip_mode "auto" (the shipped JSONs)
#           takes one pass through a gradient buffer where the planner says it fits (7B-30B here), else runs
#           forward+backward twice per step (65B); the log says which. max_grad_norm 0 with bf16 also gives one pass.
#
# Usage:   bash scripts/launch_8gpu.sh 7b [--key value ...]      # 7b | 13b | 30b | 65b
# Data:    data/train.jsonl and data/validation.jsonl with "prompt"/"completion" fields (or override
#          --dataset_name / --train_file / --text_column). Output: outputs/llama-<size>-lomo/.
# Variants:
#   bash scripts/launch_8gpu.sh 7b --deepspeed configs/zero3_bf16.json --fp16 false --bf16 true
#   bash scripts/launch_8gpu.sh 65b --deepspeed configs/zero3_bf16_offload.json --fp16 false --bf16 true
#   bash scripts/launch_8gpu.sh 7b --resume_from_checkpoint outputs/llama-7b-lomo/checkpoint-500
# Several nodes: add --hostfile HOSTFILE to the deepspeed command below (shard ranks come from each
# parameter's partition group, not LOCAL_RANK, so multi-node is supported).
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?usage: $0 7b|13b|30b|65b [--key value ...]}
shift
config=configs/llama/${size}_lomo_8x3090.json
[ -f "$config" ] || { echo "no run config $config" >&2; exit 2; }
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --module lomo_trainer "$config" "$@"
