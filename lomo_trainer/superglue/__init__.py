"""SuperGLUE: loading (hub or local JSONL), two prompt/scoring protocols, metrics, ranking evaluation.

    from lomo_trainer.superglue import load_task, evaluate, training_records
    examples = load_task("cb", "validation", data_dir="path/to/SuperGLUE", n=1000, seed=0)
    evaluate(model, tokenizer, "cb", examples)                    # {"accuracy", "f1", "score", "n", ...}
    evaluate(model, tokenizer, "rte", examples, protocol="paper")  # the LOMO paper's prompts and scoring

Command line: ``python -m lomo_trainer.superglue {zero-shot,finetune,lora,table} --help``.
"""
from .evaluation import evaluate, predict
from .loading import load_hub, load_local, load_task, subsample
from .protocols import PROTOCOLS, get_protocol
from .schema import from_hub, from_jsonl
from .tasks import TASKS, Instance, get_task, instances
from .training import training_dataset, training_records

__all__ = ["PROTOCOLS", "TASKS", "Instance", "evaluate", "predict", "from_hub", "from_jsonl", "get_protocol",
           "get_task", "instances", "load_hub", "load_local", "load_task", "subsample", "training_dataset",
           "training_records"]
