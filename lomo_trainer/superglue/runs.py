"""One SuperGLUE run: per task, a fresh model trained (LOMO, LoRA or not at all) and evaluated each epoch.

Evaluation is under a protocol; the results dict ``report`` renders. Every rank runs this with the same examples."""
from __future__ import annotations

from pathlib import Path

from .. import _hf
from .evaluation import evaluate, task_metrics
from .loading import load_task, subsample
from .protocols import get_protocol
from .training import epoch_eval_trainer, select, training_dataset

METHOD_LABELS = {"lomo": "LOMO", "lomo-lora": "LOMO+LoRA", "lora": "LoRA", "zero-shot": "zero-shot"}


def load_examples(task: str, split: str, n: int | None, opts) -> list[dict]:
    """The protocol's sampling unit drawn with ``opts.sample_seed`` (MultiRC under paper: answer options)."""
    proto = get_protocol(opts.protocol)
    examples = load_task(task, split, opts.data_dir, hub_repo=opts.hub_repo)
    return subsample(proto.units(task, examples), n, opts.sample_seed)


def run_task(task: str, train_ex, eval_ex, run, targs_kwargs, method: str, opts, lomo=None) -> tuple[dict, int]:
    """(results of one task, this process's rank). ``method`` "zero-shot": the engine is built, no step taken."""
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    proto = get_protocol(opts.protocol)
    _hf.reset_accelerate_state()  # a fresh engine per task
    epochs = {"num_train_epochs": 0, "max_steps": -1} if method == "zero-shot" else {}
    targs = TrainingArguments(**{**targs_kwargs, **epochs, "eval_strategy": "epoch",
                                 "output_dir": str(Path(targs_kwargs["output_dir"]) / task)})
    set_seed(targs.seed)  # before the model: every task starts from the same initialisation
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_name or run.model_name_or_path)
    max_length = proto.max_length or run.max_length
    train_data = training_dataset(task, train_ex, tokenizer, max_length, proto.name)

    def ranking_eval(model):
        return evaluate(model, tokenizer, task, eval_ex, opts.normalize, protocol=proto.name, max_length=max_length,
                        batch_size=targs.per_device_eval_batch_size, device=targs.device)

    model = _load_model(run, targs, method)
    trainer = _build_trainer(method, model, targs, train_data, tokenizer, opts, lomo, ranking_eval)
    out = trainer.train()
    if not trainer.evaluations or trainer.evaluations[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # no epoch ended (zero-shot) or max_steps stopped one midway: the final model
    result = select(trainer.evaluations, task_metrics(task, proto.name), proto.headline)
    result.update(train_loss=out.training_loss, train_steps=out.global_step, n_train=len(train_ex))
    rank = targs.process_index
    _release(trainer)
    del trainer, model
    _free_memory()
    return result, rank


def _load_model(run, targs, method: str):
    """Created after TrainingArguments, so a ZeRO-3 config partitions it while loading (zero.Init)."""
    import torch

    from ..cli import build_model

    # amp keeps fp32 weights for LoRA without DeepSpeed: fp16 trainable LoRA weights cannot be unscaled
    return build_model(run, targs, dtype=torch.float32 if method == "lora" and not targs.deepspeed else None)


def _build_trainer(method, model, targs, train_data, tokenizer, opts, lomo, ranking_eval):
    from ..data import CausalLMCollator

    common = dict(args=targs, train_dataset=train_data, eval_dataset=train_data.select(range(1)),  # unused
                  data_collator=CausalLMCollator(tokenizer), processing_class=tokenizer, ranking_eval=ranking_eval)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer

        from ..lora_config import check_block

        model = get_peft_model(model, LoraConfig(**check_block(lomo.lora)["config"]))
        if targs.process_index == 0:
            model.print_trainable_parameters()
        return epoch_eval_trainer(Trainer)(model=model, **common)
    from ..trainer import LOMOTrainer

    return epoch_eval_trainer(LOMOTrainer)(model=model, lomo_args=lomo, **common)


def _release(trainer) -> None:
    """Unhook the task's engine and drop the trainer's references to it and the model."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.accelerator = None


def _free_memory() -> None:
    """Collect the released model (reference cycles) so the next task's fits on the GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
