"""A training script for ``accelerate launch`` whose DeepSpeed config lives only in accelerate's YAML
(test_trl_launch.py): TrainingArguments has no ``deepspeed``. ``python accelerate_train.py OUT MAX_STEPS [RESUME]``."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from transformers import TrainingArguments  # noqa: E402

from lomo_trainer import LOMOTrainer  # noqa: E402
from models import tiny_llama  # noqa: E402
from trainers import _dataset  # noqa: E402

out, max_steps = sys.argv[1], int(sys.argv[2])
resume = sys.argv[3] if len(sys.argv) > 3 else None
args = TrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=2, max_steps=max_steps,
                         learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[],
                         logging_steps=1, save_strategy="steps", save_steps=2, seed=0, disable_tqdm=True)
assert args.deepspeed is None and args.deepspeed_plugin is not None, "the YAML's DeepSpeed plugin is expected"
trainer = LOMOTrainer(model=tiny_llama(), args=args, train_dataset=_dataset(32))
trainer.train(resume_from_checkpoint=resume)
from lomo_trainer import _zero  # noqa: E402

assert all(_zero.is_zero3_param(p) for p in trainer.model.parameters()), "trained as a ZeRO-3 engine"
trainer.save_model(os.path.join(out, "final"))
if trainer.is_world_process_zero():
    print(f"LOMO_SOURCE {trainer._ds_config_source}")
