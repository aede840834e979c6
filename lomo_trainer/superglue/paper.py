"""The LOMO paper's SuperGLUE prompts and answer rules, as its code builds them.

Written from reading OpenLMLab/LOMO (``lomo/src/mydatasets.py``: ``get_dataset_info``, ``process_record``,
``MyDataset.process``; ``lomo/src/prompts.py``: ``Question._get_prompt``, ``Exemplar``). Nothing is copied;
the strings below reproduce what that code produces, and ``tests/test_superglue_paper.py`` pins them.

- "brown" prompt (every task but COPA): each part followed by ``\\n``, then ``Answer: ``; candidates are the
  bare answer strings (``Yes``/``No``, no leading space: the prompt ends with the space).
- COPA's "natural" prompt: its one part with the newline stripped, ``{premise} so `` / ``{premise} because ``;
  the candidates are the choices as written (full stop and capital kept).
- ReCoRD: candidates are the entity strings, minus any that spell a gold answer other than the first; the
  gold is the first answer (answers sorted, as on the hub). Its code takes the hub's ``entities`` as stored:
  unique, but since the super_glue script's 1.0.3 (entity_spans added) a Python set written in the hash order
  of the process that built the data, so not reproducible; sorted here (as 1.0.2 stored them). Same
  candidates and gold; only an exact score tie can resolve differently (both take the first best).
- MultiRC: one example per answer option (the hub's rows), so 1000 samples are 1000 options.
- CB: its code has CB commented out, so the protocol has no CB.
"""
from __future__ import annotations

from .tasks import Instance

TASKS = ("boolq", "copa", "multirc", "record", "rte", "wic", "wsc")
NO_YES = ["No", "Yes"]


def _brown(*parts: str) -> str:
    return "".join(part + "\n" for part in parts) + "Answer: "


def _boolq(ex):  # no "Question:" label, the question as stored (lower case, no "?")
    return [Instance(_brown(f"{ex['passage']} {ex['question']}"), NO_YES, ex["label"])]


def _rte(ex):  # label 0 is entailment: "Yes" first
    part = f"{ex['premise']}\nDoes this mean that \"{ex['hypothesis']}\" is true? Yes or No?"
    return [Instance(_brown(part), ["Yes", "No"], ex["label"])]


def _wic(ex):
    part = (f"Does the word \"{ex['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{ex['sentence1']}\n{ex['sentence2']}")
    return [Instance(_brown(part), NO_YES, ex["label"])]


def _wsc(ex):  # "pronuon" is the paper's spelling: the prompt is reproduced as run
    part = (f"{ex['text']}\nIn the previous sentence, does the pronuon \"{ex['span2_text']}\" refer to "
            f"\"{ex['span1_text']}\"? Yes or No?")
    return [Instance(_brown(part), NO_YES, ex["label"])]


def _copa(ex):
    joiner = " so " if ex["question"] == "effect" else " because "
    return [Instance(f"{ex['premise']}{joiner}\n".strip("\n"), [ex["choice1"], ex["choice2"]], ex["label"])]


def _multirc(ex):
    labels = ex["labels"] or [None] * len(ex["answers"])
    return [Instance(_brown(ex["passage"], f"Question: {ex['question']}",
                            f"I found this answer \"{answer}\". Is that correct? Yes or No?"), NO_YES, label)
            for answer, label in zip(ex["answers"], labels)]


def _record(ex):
    entities = sorted(set(ex["entities"]))  # the paper's order is the hub's set order: see the module doc
    answers = ex["answers"]  # sorted, unique (schema)
    if len(answers) > 1:  # an entity spelling another gold answer would be a right answer scored wrong
        entities = [e for e in entities if e not in answers[1:]]
    gold = None
    if answers:
        if answers[0] not in entities:
            raise ValueError(f"ReCoRD example {ex['idx']}: gold answer {answers[0]!r} is not a passage entity; "
                             "the paper's protocol needs it among the candidates.")
        gold = entities.index(answers[0])
    passage = ex["passage"].replace("@highlight\n", "- ")
    return [Instance(_brown(f"{passage}\n{ex['query']}\nQuestion: What is the \"@placeholder\"?"), entities, gold)]


TEMPLATES = {"boolq": _boolq, "copa": _copa, "multirc": _multirc, "record": _record, "rte": _rte, "wic": _wic,
             "wsc": _wsc}


def instances(task: str, example: dict) -> list[Instance]:
    if task not in TEMPLATES:
        raise ValueError(f"the paper's protocol has no {task!r} (its code builds {', '.join(TASKS)}); "
                         "use --protocol standard for it.")
    return TEMPLATES[task](example)


def units(task: str, examples: list[dict]) -> list[dict]:
    """Examples in the paper's sampling unit: a MultiRC question splits into one example per answer option."""
    if task != "multirc":
        return examples
    return [{**ex, "idx": f"{ex['idx']}-{k}", "answers": [a], "labels": None if ex["labels"] is None else [ex["labels"][k]]}
            for ex in examples for k, a in enumerate(ex["answers"])]


def encode(tokenizer, context: str, candidate: str, max_length: int):
    """The paper's tokenisation: ``context + candidate`` in one piece, cut from the right at ``max_length``,
    EOS appended; targets start at ``len(encode(context)) - 1`` (with LLaMA's tokenizer that skips the "▁"
    a trailing space becomes). Returned as (context ids, target ids) for ``ranking.score_pairs``."""
    ids = list(tokenizer(context + candidate, truncation=True, max_length=max_length)["input_ids"])
    ids.append(tokenizer.eos_token_id)
    start = max(len(tokenizer(context)["input_ids"]) - 1, 1)  # label 0 is never a target after the shift
    return ids[:start], ids[start:]
