#!/usr/bin/env bash
# SuperGLUE with LLaMA-7B..65B on one machine of 8 x RTX 3090 (24 GB each): zero-shot, LoRA, LOMO and LOMO+LoRA on
# the eight tasks (BoolQ CB COPA MultiRC ReCoRD RTE WiC WSC), then one markdown table of the methods.
#
# Hardware: 8 GPUs of 24 GB; CPU RAM >= 2 x the fp16 model size for loading (65B: ~260 GB). One process per
#           GPU through the deepspeed launcher; every run is ZeRO-3 fp16 (configs/zero3_fp16.json).
# Recipe:   configs/superglue/<size>_<method>_8x3090.json (one per size and method; task and output dir come from
#           here), the paper's: LOMO lr 0.03, global batch 16
#           (2 per GPU), 10 epochs, linear schedule with 10% warmup, norm clipping 1.0, activation
#           checkpointing, 1000 training / 1000 validation examples per task (seed 0, the same examples
#           for every method). LoRA: r 8, alpha 16, dropout 0.05 on q_proj,v_proj, AdamW lr 5e-4, same
#           schedule, batch and ZeRO-3 set-up (the DeepSpeed JSON without its LOMO block). LOMO+LoRA: LOMO at
#           0.03 on the base weights and the same adapters stepped by AdamW at 5e-4, in one backward.
# Memory:   LOMO keeps no optimizer state and no gradient buffer: a GPU holds 1/8 of the fp16 weights
#           (65B: ~16 GB) + activations + one parameter's gradient; see
#             python -m lomo_trainer.planner --model 65b --gpus 8 --gpu-mem-gb 24 --activation-checkpointing
#           LoRA's AdamW state is tiny (adapters only); its frozen weights are sharded the same way.
# Time:     1000 examples x 10 epochs / 16 = 630 steps per task (fewer for CB, COPA, WSC: all their
#           training examples); global-norm clipping runs forward+backward twice per step. Rough guide,
#           not measured here: 7B about 0.5-1 h per task for LOMO, 65B several hours per task; the
#           evaluation of 1000 examples costs a few minutes (ReCoRD and MultiRC: more candidates).
# Output:   outputs/superglue/llama-<size>/<protocol>/<task>/{zero-shot,lora,lomo,lomo-lora}/results.{json,md} and
#           outputs/superglue/llama-<size>/<protocol>/table.md (one row per method).
#
# Usage:    bash scripts/superglue_8gpu.sh 7b [--key value ...]     # 7b | 13b | 30b | 65b
#           Extra arguments go to every finetune/lora command (superglue flags or run-config overrides).
# Data:     DATA_DIR=path/to/SuperGLUE (the release's <Task>/{train,val}.jsonl); unset: the hub's super_glue.
# Variants:
#   TASKS="cb copa rte" bash scripts/superglue_8gpu.sh 7b             # a subset of the tasks
#   METHODS="lomo" bash scripts/superglue_8gpu.sh 13b                 # only LOMO (zero-shot lora lomo lomo-lora)
#   REPORT_TO=wandb bash scripts/superglue_8gpu.sh 7b                 # results to wandb too
#   bash scripts/superglue_8gpu.sh 7b --deepspeed configs/zero3_bf16.json --fp16 false --bf16 true
#   bash scripts/superglue_8gpu.sh 30b --n-train 500 --n-eval 500
#   PROTOCOL=paper bash scripts/superglue_8gpu.sh 7b                  # the paper's protocol (no CB)
# One process per task and method: a fresh DeepSpeed engine and a fully released GPU for each run (one
# command can also loop over tasks: --tasks cb,copa with a single config).
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?usage: $0 7b|13b|30b|65b [--key value ...]}
shift
default_tasks="boolq cb copa multirc record rte wic wsc"
[ "${PROTOCOL:-standard}" = paper ] && default_tasks="boolq copa multirc record rte wic wsc"
tasks=${TASKS:-$default_tasks}
methods=${METHODS:-zero-shot lora lomo lomo-lora}
out=outputs/superglue/llama-$size/${PROTOCOL:-standard}
common=(--report-to "${REPORT_TO:-none}" --protocol "${PROTOCOL:-standard}")
[ -n "${DATA_DIR:-}" ] && common+=(--data-dir "$DATA_DIR")

launch() { deepspeed --num_gpus "${NUM_GPUS:-8}" --module lomo_trainer.superglue "$@"; }

config() { echo "configs/superglue/${size}_$1_8x3090.json"; }
[ -f "$(config lomo)" ] || { echo "no run config $(config lomo) (sizes: 7b 13b 30b 65b)" >&2; exit 2; }
results=()
for task in $tasks; do
  for method in $methods; do
    dir=$out/$task/$method
    echo "=== llama-$size $task $method -> $dir"
    case $method in
      zero-shot) launch zero-shot --config "$(config lomo)" --tasks "$task" "${common[@]}" --output_dir "$dir" "$@" ;;
      lora)      launch lora --config "$(config lora)" --tasks "$task" "${common[@]}" --output_dir "$dir" "$@" ;;
      lomo)      launch finetune --config "$(config lomo)" --tasks "$task" "${common[@]}" --output_dir "$dir" "$@" ;;
      lomo-lora) launch finetune --method lomo-lora --config "$(config lomo_lora)" --tasks "$task" "${common[@]}" \
                   --output_dir "$dir" "$@" ;;
      *) echo "unknown method $method (zero-shot lora lomo lomo-lora)" >&2; exit 2 ;;
    esac
    results+=("$dir/results.json")
  done
done
python -m lomo_trainer.superglue table "${results[@]}" --output "$out/table.md"
