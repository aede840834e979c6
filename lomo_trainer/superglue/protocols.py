"""The two SuperGLUE protocols: what is prompted, how candidates are tokenised and scored, what is reported.

=========  ==================================================  ==============================================
           ``standard`` (default)                              ``paper`` (the LOMO paper's code)
=========  ==================================================  ==============================================
prompts    ``tasks.py``: one template per task, all 8 tasks    ``paper.py``: its code's prompts; no CB
tokens     prompt (with BOS) and candidate apart, EOS          prompt + candidate in one piece, EOS appended
           appended, prompt cut from the left                  after a cut from the right
max length the run config's ``max_length``                     1024
unit       MultiRC: a question, ReCoRD: a query                MultiRC: an answer option, ReCoRD: a query
metrics    SuperGLUE's (CB acc/F1, MultiRC F1a/EM, ReCoRD      accuracy on every task
           F1/EM, else accuracy)
headline   the last epoch's results                            the best epoch's (the paper reported the best)
=========  ==================================================  ==============================================

Both score a candidate by the summed log-likelihood of exactly the tokens its training example is trained on
(its answer tokens and the EOS), so a fine-tuned model is scored on what it learnt.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..ranking import encode_pair
from . import paper, tasks


class Protocol(NamedTuple):
    name: str
    tasks: tuple[str, ...]
    instances: Callable  # (task, normalised example) -> [Instance]
    encode: Callable  # (tokenizer, context, candidate, max_length) -> (context ids, target ids)
    units: Callable  # (task, examples) -> examples in the protocol's sampling unit
    max_length: int | None  # None: the run's
    accuracy_only: bool
    headline: str  # "best" or "last": which evaluation heads a task's results


def _standard_encode(tokenizer, context, candidate, max_length):
    return encode_pair(tokenizer, context, candidate, max_length, add_eos=True)


def _paper_encode(tokenizer, context, candidate, max_length):
    if tokenizer.eos_token_id is None:
        raise ValueError("the paper's protocol appends EOS, but the tokenizer has none; set its eos_token.")
    return paper.encode(tokenizer, context, candidate, max_length)


PROTOCOLS = {
    "standard": Protocol("standard", tuple(tasks.TASKS), tasks.instances, _standard_encode, lambda t, ex: ex,
                         None, False, "last"),
    "paper": Protocol("paper", paper.TASKS, paper.instances, _paper_encode, paper.units, 1024, True, "best"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[name]


def check_tasks(protocol: Protocol, names: list[str]) -> None:
    missing = [n for n in names if n not in protocol.tasks]
    if missing:
        raise ValueError(f"the {protocol.name} protocol has no {', '.join(missing)} (it has {', '.join(protocol.tasks)}).")


def gold_completion(protocol: Protocol, task: str, example: dict, inst) -> str:
    """The candidate a training example teaches. Standard ReCoRD: the first entity spelling a gold answer, or
    the first gold answer filled into the query when no entity spells it; paper ReCoRD: its gold entity."""
    if inst.gold is None:
        raise ValueError(f"{task} example {example['idx']} has no label; train on a labelled split (train or validation).")
    if task == "record" and protocol.name == "standard":
        return inst.candidates[inst.gold[0]] if inst.gold else " " + example["query"].replace("@placeholder", example["answers"][0])
    return inst.candidates[inst.gold]
