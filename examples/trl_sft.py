"""A typical TRL SFT script, with LOMO's fused update: the marked import and the line after it are all that changed.

    # 8 GPUs, DeepSpeed set in accelerate's YAML only (no --deepspeed):
    accelerate launch --config_file configs/accelerate_zero3_8gpu.yaml examples/trl_sft.py \\
        --model_name_or_path Qwen/Qwen3-8B --dataset_name trl-lib/Capybara --output_dir outputs/qwen3-8b-sft \\
        --learning_rate 1e-2 --max_grad_norm 1.0 --per_device_train_batch_size 2 --gradient_checkpointing true
    # or with the DeepSpeed JSON on the command line (any launcher: torchrun, deepspeed, accelerate):
    torchrun --nproc_per_node 8 examples/trl_sft.py --deepspeed configs/zero3_bf16.json ...
    # a plain process (a world of one), CPU:
    DS_ACCELERATOR=cpu python examples/trl_sft.py --deepspeed configs/zero3_cpu.json --use_cpu --bf16 false ...

LOMO is SGD: its learning rate is about 1e-2 to 3e-2 for full fine-tuning (the paper's 0.03 with clipping at 1.0), not
AdamW's 2e-5 (SFTConfig's default). Everything else is SFTTrainer's: datasets (language modelling, prompt-completion,
conversational), its collator, packing, its loss and metrics, callbacks, saving.
"""
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from lomo_trainer import LOMOTrainer  # added
SFTTrainer = LOMOTrainer.wrap(SFTTrainer)  # added: SFTTrainer with LOMO's update instead of AdamW


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="HuggingFaceTB/SmolLM2-135M-Instruct")
    dataset_name: str = field(default="trl-lib/Capybara", metadata={"help": "a hub dataset, or json/csv/parquet"})
    data_files: str | None = field(default=None, metadata={"help": "local files for dataset_name json/csv/parquet"})
    dataset_train_split: str = "train"


def main():
    script_args, training_args = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses()
    dataset = load_dataset(script_args.dataset_name, data_files=script_args.data_files,
                           split=script_args.dataset_train_split)
    trainer = SFTTrainer(model=script_args.model_name_or_path, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
