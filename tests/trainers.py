"""LOMOTrainer test set-up shared by the trainer, conformance, fault, schedule and LoRA tests: data, arguments, a
DeepSpeed JSON, a trainer that records the batches it drew, and the gathered weights."""
import torch
from transformers import TrainingArguments

from models import VOCAB, tiny_llama

STEPS = 6


def _dataset(n=16, seq=12):
    from datasets import Dataset

    ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(out, ds_config=None, **kw):
    base = dict(output_dir=out, deepspeed=ds_config, use_cpu=True, per_device_train_batch_size=2, max_steps=STEPS,
                learning_rate=0.5, lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.0, report_to=[],
                logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def ds_config(clip="auto"):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3}, "optimizer": {"type": "LOMO", "params": {"lr": "auto"}},
            "gradient_clipping": clip}


class Recorder:
    """Wraps compute_loss to record the batches the trainer actually drew, per step."""

    def __init__(self):
        self.batches = []


def make_trainer(args, recorder=None, callbacks=None):
    from lomo_trainer import LOMOTrainer

    class Recording(LOMOTrainer):
        def compute_loss(self, model, inputs, **kw):
            from lomo_trainer.optim.engine import _IN_CLOSURE

            if recorder is not None and torch.is_grad_enabled() and self.optimizer._sink is _IN_CLOSURE:
                if not recorder.batches or recorder.batches[-1][0] != self.state.global_step:
                    recorder.batches.append((self.state.global_step, inputs["input_ids"].clone()))
            return super().compute_loss(model, inputs, **kw)

    return Recording(model=tiny_llama(), args=args, train_dataset=_dataset(), callbacks=callbacks)


def gathered_weights(trainer):
    from lomo_trainer import _zero

    if trainer.deepspeed is None:
        return {k: v.double().clone() for k, v in trainer.model.state_dict().items()}
    sd = _zero.consolidated_state_dict(trainer.deepspeed)
    return {k: v.double().clone() for k, v in sd.items()} if sd else None
