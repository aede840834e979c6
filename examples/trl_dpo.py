"""A typical TRL DPO script, with LOMO's fused update: the marked import and the line after it are all that changed.

    accelerate launch --config_file configs/accelerate_zero3_8gpu.yaml examples/trl_dpo.py \\
        --model_name_or_path Qwen/Qwen3-8B --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir outputs/qwen3-8b-dpo --learning_rate 1e-3 --beta 0.1 --max_grad_norm 1.0
    # a plain process (a world of one), CPU:
    DS_ACCELERATOR=cpu python examples/trl_dpo.py --deepspeed configs/zero3_cpu.json --use_cpu --bf16 false ...

The reference model is DPOTrainer's: loaded from the same checkpoint and, under ZeRO-3, prepared as an inference-only
partitioned DeepSpeed engine. LOMO never updates it and it holds no gradients; LOMO's memory saving applies to the
policy (no optimizer state, no full gradient). The policy's learning rate is SGD's, well above AdamW's 5e-7.
"""
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer

from lomo_trainer import LOMOTrainer  # added
DPOTrainer = LOMOTrainer.wrap(DPOTrainer)  # added: DPOTrainer with LOMO's update instead of AdamW


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="HuggingFaceTB/SmolLM2-135M-Instruct")
    dataset_name: str = field(default="trl-lib/ultrafeedback_binarized",
                              metadata={"help": "a hub dataset, or json/csv/parquet"})
    data_files: str | None = field(default=None, metadata={"help": "local files for dataset_name json/csv/parquet"})
    dataset_train_split: str = "train"


def main():
    script_args, training_args = HfArgumentParser((ScriptArguments, DPOConfig)).parse_args_into_dataclasses()
    dataset = load_dataset(script_args.dataset_name, data_files=script_args.data_files,
                           split=script_args.dataset_train_split)
    trainer = DPOTrainer(model=script_args.model_name_or_path, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
