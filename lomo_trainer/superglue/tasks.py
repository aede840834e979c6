"""The eight SuperGLUE tasks: names, where their data lives, and one prompt template each.

A template turns a normalised example (see ``schema``) into one or more ``Instance(context, candidates,
gold)``: the model ranks ``candidates`` as continuations of ``context`` (see ``lomo_trainer.ranking``).
Candidates carry their leading space. ``gold`` is the index of the right candidate (None when
unlabelled); ReCoRD's is a tuple of indices, since several entities can spell a gold answer.

=======  ====================================================================  =============================
task     context                                                               candidates (gold)
=======  ====================================================================  =============================
BoolQ    ``{passage}\\nQuestion: {question}?\\nAnswer:``                        `` No`` / `` Yes`` (label)
CB       ``{premise}\\nQuestion: {hypothesis} True, False, or Neither?\\nAnswer:``  `` True`` / `` False`` /
                                                                               `` Neither`` (entailment,
                                                                               contradiction, neutral)
COPA     ``{premise without final .} because`` (cause) / `` so`` (effect)       `` {choice1}`` / `` {choice2}``,
                                                                               first letter lowercased
RTE      ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:``         `` True`` / `` False``
                                                                               (entailment, not_entailment)
WiC      ``Does the word "{word}" have the same meaning in these two          `` No`` / `` Yes``
         sentences?\\n{sentence1}\\n{sentence2}\\nAnswer:``
WSC      ``{text}\\nQuestion: In the passage above, does the pronoun            `` No`` / `` Yes``
         "{span2_text}" refer to "{span1_text}"?\\nAnswer:``
MultiRC  one instance per answer option: ``{passage}\\nQuestion: {question}\\n   `` No`` / `` Yes``
         Candidate answer: {answer}\\nIs the candidate answer correct?\\nAnswer:``
ReCoRD   ``{passage}`` with each ``@highlight\\n`` as ``- ``                     `` {query}`` with @placeholder
                                                                               replaced by each entity
                                                                               (entities spelling a gold
                                                                               answer)
=======  ====================================================================  =============================

The BoolQ question gets a ``?`` only when it does not end with one.
"""
from __future__ import annotations

from typing import NamedTuple


class Instance(NamedTuple):
    context: str
    candidates: list[str]
    gold: int | tuple[int, ...] | None


class Task(NamedTuple):
    name: str  # canonical lower-case key
    dirname: str  # folder name in the SuperGLUE release
    hub_config: str  # config of `super_glue` / `aps/super_glue`
    metrics: tuple[str, ...]  # keys evaluate() reports; their mean is the task score


TASKS = {t.name: t for t in (
    Task("boolq", "BoolQ", "boolq", ("accuracy",)),
    Task("cb", "CB", "cb", ("accuracy", "f1")),
    Task("copa", "COPA", "copa", ("accuracy",)),
    Task("multirc", "MultiRC", "multirc", ("f1a", "em")),
    Task("record", "ReCoRD", "record", ("f1", "em")),
    Task("rte", "RTE", "rte", ("accuracy",)),
    Task("wic", "WiC", "wic", ("accuracy",)),
    Task("wsc", "WSC", "wsc.fixed", ("accuracy",)),  # .fixed: the hub's copy with corrected span indices
)}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown SuperGLUE task {name!r}; use one of {', '.join(t.dirname for t in TASKS.values())}.")
    return TASKS[key]


NO_YES = [" No", " Yes"]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _boolq(ex):
    q = ex["question"].strip()
    q = q if q.endswith("?") else q + "?"
    return [Instance(f"{ex['passage']}\nQuestion: {q}\nAnswer:", NO_YES, ex["label"])]


def _cb(ex):
    ctx = f"{ex['premise']}\nQuestion: {ex['hypothesis']} True, False, or Neither?\nAnswer:"
    return [Instance(ctx, [" True", " False", " Neither"], ex["label"])]


def _copa(ex):
    joiner = {"cause": "because", "effect": "so"}[ex["question"]]
    premise = ex["premise"].strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    return [Instance(f"{premise} {joiner}", [" " + _lower_first(ex["choice1"]), " " + _lower_first(ex["choice2"])],
                     ex["label"])]


def _rte(ex):
    return [Instance(f"{ex['premise']}\nQuestion: {ex['hypothesis']} True or False?\nAnswer:", [" True", " False"],
                     ex["label"])]


def _wic(ex):
    ctx = (f"Does the word \"{ex['word']}\" have the same meaning in these two sentences?\n"
           f"{ex['sentence1']}\n{ex['sentence2']}\nAnswer:")
    return [Instance(ctx, NO_YES, ex["label"])]


def _wsc(ex):
    ctx = (f"{ex['text']}\nQuestion: In the passage above, does the pronoun \"{ex['span2_text']}\" refer to "
           f"\"{ex['span1_text']}\"?\nAnswer:")
    return [Instance(ctx, NO_YES, ex["label"])]


def _multirc(ex):
    labels = ex["labels"] or [None] * len(ex["answers"])
    return [Instance(f"{ex['passage']}\nQuestion: {ex['question']}\nCandidate answer: {answer}\n"
                     "Is the candidate answer correct?\nAnswer:", NO_YES, label)
            for answer, label in zip(ex["answers"], labels)]


def _record(ex):
    if "@placeholder" not in ex["query"]:
        raise ValueError(f"ReCoRD example {ex['idx']}: query has no @placeholder: {ex['query']!r}")
    context = ex["passage"].replace("@highlight\n", "- ")
    candidates = [" " + ex["query"].replace("@placeholder", e) for e in ex["entities"]]
    gold = tuple(i for i, e in enumerate(ex["entities"]) if e in ex["answers"]) if ex["answers"] else None
    return [Instance(context, candidates, gold)]


TEMPLATES = {"boolq": _boolq, "cb": _cb, "copa": _copa, "multirc": _multirc, "record": _record,
             "rte": _rte, "wic": _wic, "wsc": _wsc}


def instances(task: str, example: dict) -> list[Instance]:
    """The prompt instances of one normalised example (MultiRC: one per answer option)."""
    return TEMPLATES[get_task(task).name](example)
