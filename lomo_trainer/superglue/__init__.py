"""SuperGLUE: loading (hub or local JSONL), prompt templates, metrics and ranking evaluation.

    from lomo_trainer.superglue import load_task, evaluate, training_records
    examples = load_task("cb", "validation", data_dir="path/to/SuperGLUE", n=1000, seed=0)
    evaluate(model, tokenizer, "cb", examples, normalize="sum")  # {"accuracy", "f1", "score", "n", ...}

Command line: ``python -m lomo_trainer.superglue {zero-shot,finetune,lora,table} --help``.
"""
from .evaluation import evaluate, predict
from .loading import load_hub, load_local, load_task, subsample
from .schema import from_hub, from_jsonl
from .tasks import TASKS, Instance, get_task, instances
from .training import IGNORE_INDEX, tokenize_record, training_records

__all__ = ["TASKS", "Instance", "evaluate", "predict", "from_hub", "from_jsonl", "get_task", "instances",
           "load_hub", "load_local", "load_task", "subsample", "training_records", "tokenize_record", "IGNORE_INDEX"]
