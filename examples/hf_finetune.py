"""An HF fine-tuning script where `Trainer` became `LOMOTrainer`: nothing else changes.

    # CPU, 2 processes, the shipped tiny model and data (about a minute):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/hf_finetune.py --deepspeed configs/zero3_cpu.json --use_cpu
    # 8 GPUs:
    deepspeed --num_gpus 8 examples/hf_finetune.py --model meta-llama/Llama-3.1-8B --deepspeed configs/zero3_bf16.json --bf16
"""
import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from lomo_trainer import LOMOTrainer  # was: from transformers import Trainer
from lomo_trainer.data import CausalLMCollator, build_datasets

ASSETS = "lomo_trainer/assets"

p = argparse.ArgumentParser()
p.add_argument("--model", default=f"{ASSETS}/tiny-llama")
p.add_argument("--deepspeed", default=None)
p.add_argument("--fp16", action="store_true")
p.add_argument("--bf16", action="store_true")
p.add_argument("--use_cpu", action="store_true")
p.add_argument("--max_steps", type=int, default=150)
p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
cli = p.parse_args()

# TrainingArguments before the model: with a ZeRO-3 config, from_pretrained then loads partitioned weights.
args = TrainingArguments(output_dir="outputs/hf_finetune", deepspeed=cli.deepspeed, fp16=cli.fp16, bf16=cli.bf16,
                         use_cpu=cli.use_cpu, per_device_train_batch_size=16, learning_rate=0.1, max_grad_norm=0.0, max_steps=cli.max_steps,
                         lr_scheduler_type="linear", warmup_steps=10, logging_steps=25, save_strategy="no",
                         report_to=[])
tokenizer = AutoTokenizer.from_pretrained(cli.model)
data = build_datasets(tokenizer, train_file=f"{ASSETS}/sentiment/train.jsonl",
                      validation_file=f"{ASSETS}/sentiment/validation.jsonl", max_length=32)
if cli.model.startswith(ASSETS):  # the shipped model has no weights: start from random ones
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cli.model))
else:
    dtype = torch.float16 if cli.fp16 else torch.bfloat16 if cli.bf16 else None
    model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=dtype)

trainer = LOMOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer)
trainer.train()
print(trainer.evaluate())
trainer.save_model()
