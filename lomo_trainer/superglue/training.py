"""Training records: the prompt followed by the gold answer, with the prompt masked out of the loss.

``training_records`` gives ``{"prompt", "completion"}`` dicts for a prompt/completion data layer (which
must mask the prompt, label -100); ``tokenize_record`` does the tokenisation itself, the way
``lomo_trainer.ranking`` scores candidates (prompt with special tokens, completion without, ids
concatenated), so training and evaluation see the answer tokenised the same way.
"""
from __future__ import annotations

from .tasks import get_task, instances

IGNORE_INDEX = -100


def training_records(task: str, examples: list[dict]) -> list[dict]:
    """One record per instance (MultiRC: per answer option). ReCoRD: the first entity spelling a gold
    answer, or the first gold answer filled into the query when no entity spells it."""
    name = get_task(task).name
    records = []
    for ex in examples:
        for inst in instances(name, ex):
            if inst.gold is None:
                raise ValueError(f"{name} example {ex['idx']} has no label; train on a labelled split (train or validation).")
            if name == "record":
                completion = (inst.candidates[inst.gold[0]] if inst.gold
                              else " " + ex["query"].replace("@placeholder", ex["answers"][0]))
            else:
                completion = inst.candidates[inst.gold]
            records.append({"prompt": inst.context, "completion": completion})
    return records


def tokenize_record(record: dict, tokenizer, max_length: int | None = None, add_eos: bool = False) -> dict:
    """``input_ids``/``labels``/``attention_mask`` lists; the prompt's labels are -100. Over-long records lose
    prompt tokens from the left, as in ranking; a completion that does not fit alone is an error."""
    prompt = list(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
    completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token; set one or pass add_eos=False.")
        completion.append(tokenizer.eos_token_id)
    if max_length is not None:
        if len(completion) >= max_length:
            raise ValueError(f"completion of {len(completion)} tokens does not fit max_length={max_length}; raise max_length.")
        prompt = prompt[len(prompt) + len(completion) - max_length:] if len(prompt) + len(completion) > max_length else prompt
    ids = prompt + completion
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + completion, "attention_mask": [1] * len(ids)}
