"""A DeepSpeed scheduler block under LOMOTrainer: the lr at each step is the one DeepSpeed's own engine uses, and
a resumed run equals the uninterrupted one."""
import pytest
import os

import torch
from transformers import TrainerCallback

from distributed import run_ranks
from trainers import STEPS, _args, ds_config, gathered_weights, make_trainer

# 2 warmup steps ("auto": TrainingArguments.warmup_steps), peak "auto": learning_rate 0.5, decay to step 6
BLOCK = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.05, "warmup_max_lr": "auto",
                                             "warmup_num_steps": "auto", "total_num_steps": "auto",
                                             "warmup_type": "linear"}}


class LrAtStep(TrainerCallback):
    """The lr each step runs with (set before the step, as DeepSpeed's engine leaves it)."""

    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def deepspeed_engine_lrs(rank, world):
    """DeepSpeed's engine with the same block (its "auto" values written out) around torch's SGD."""
    import deepspeed

    model = torch.nn.Linear(2, 2)
    block = {"type": BLOCK["type"], "params": {**BLOCK["params"], "warmup_max_lr": 0.5, "warmup_num_steps": 2,
                                               "total_num_steps": STEPS}}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "scheduler": block}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                      config=config)
    lrs = []
    for _ in range(STEPS):
        lrs.append(engine.get_lr()[0])
        engine.backward(engine(torch.ones(1, 2, device=engine.device)).sum())
        engine.step()
    return lrs


def train(rank, world, out, resume=None):
    lr_at = LrAtStep()
    trainer = make_trainer(_args(out, {**ds_config(0.0), "scheduler": BLOCK}, save_strategy="steps", save_steps=3),
                           callbacks=[lr_at])
    trainer.train(resume_from_checkpoint=resume)
    return gathered_weights(trainer), lr_at.lrs, type(trainer.lr_scheduler).__module__


@pytest.mark.multirank
def test_deepspeed_scheduler_block_lr_per_step_and_resume(tmp_path):
    # each phase in fresh ranks: accelerate allows one DeepSpeed Accelerator per process
    expected_lrs = run_ranks(deepspeed_engine_lrs, 1)[0]
    weights, lrs, module = run_ranks(train, 1, str(tmp_path / "a"))[0]
    assert module == "deepspeed.runtime.lr_schedules"
    assert lrs == expected_lrs and len(set(lrs)) > 3, lrs
    checkpoint = os.path.join(tmp_path, "a", "checkpoint-3")
    resumed, resumed_lrs, _ = run_ranks(train, 1, str(tmp_path / "b"), checkpoint)[0]
    assert resumed_lrs == expected_lrs[3:]
    for name in weights:
        assert torch.equal(weights[name], resumed[name]), f"resumed run differs at {name}"
