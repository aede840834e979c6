"""Normalise SuperGLUE records, from local JSONL files or from the hub, into one example form.

Both sources go through a per-source adapter that only renames and regroups fields, then through the same
``_finish`` that converts labels and checks types, so a hub row and the equivalent JSONL line give equal
examples. Normalised examples are plain dicts (picklable, JSON-serialisable):

=========  ======================================================================================
task       fields (``idx`` is always a string; ``label``/``labels``/``answers`` empty/None when unlabelled)
=========  ======================================================================================
boolq      idx, passage, question, label: 0 (False) | 1 (True)
cb         idx, premise, hypothesis, label: 0 entailment | 1 contradiction | 2 neutral
copa       idx, premise, choice1, choice2, question: 'cause' | 'effect', label: 0 | 1 (which choice)
rte        idx, premise, hypothesis, label: 0 entailment | 1 not_entailment
wic        idx, word, sentence1, sentence2, start1, end1, start2, end2, label: 0 | 1
wsc        idx, text, span1_text, span1_index, span2_text, span2_index, label: 0 | 1 (span2 refers to span1)
multirc    idx "<paragraph>-<question>", passage, question, answers: [str], labels: [0|1] or None
           (one example per question: the metrics group answer options by question)
record     idx "<passage>-<query>", passage, query (with @placeholder), entities: [str] (unique, in order of
           first occurrence in the passage), answers: [str] (unique, sorted)
=========  ======================================================================================

Source differences handled here: the hub stores labels as ints (-1 when unlabelled) where JSONL uses
strings or bools; the hub flattens WSC's ``target`` and MultiRC's nesting (one row per answer option, with
``idx = {paragraph, question, answer}``); the hub's ReCoRD has one row per query with ``entity_spans``.
ReCoRD JSONL entity spans are inclusive (``text[start:end + 1]``), as in the SuperGLUE release.
"""
from __future__ import annotations

CB_LABELS = ("entailment", "contradiction", "neutral")
RTE_LABELS = ("entailment", "not_entailment")

FIELDS = {
    "boolq": ("passage", "question"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2", "start1", "end1", "start2", "end2"),
    "wsc": ("text", "span1_text", "span1_index", "span2_text", "span2_index"),
}


def _get(rec, key, where):
    if not isinstance(rec, dict) or key not in rec:
        raise ValueError(f"{where}: missing field {key!r}; SuperGLUE records need it (check the file's task and layout).")
    return rec[key]


def _label(value, names, where):
    """Label as an int index, or None when unlabelled (absent, None, or the hub's -1)."""
    if value is None or value == -1:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        if value.lower() in ("true", "false") and names is None:
            return int(value.lower() == "true")
        if names is None or value not in names:
            raise ValueError(f"{where}: unknown label {value!r}; expected one of {names or (True, False)}.")
        return names.index(value)
    if isinstance(value, int) and 0 <= value < (len(names) if names else 2):
        return value
    raise ValueError(f"{where}: bad label {value!r}; expected one of {names or (True, False)} or its index.")


def _finish(task, fields, where):
    """The step both sources share: label conversion and type checks."""
    ex = dict(fields)
    ex["idx"] = str(ex["idx"])
    if task in FIELDS:
        names = {"cb": CB_LABELS, "rte": RTE_LABELS}.get(task)
        ex["label"] = _label(ex.get("label"), names, where)
        if task == "copa" and ex["question"] not in ("cause", "effect"):
            raise ValueError(f"{where}: COPA question must be 'cause' or 'effect', got {ex['question']!r}.")
    elif task == "multirc":
        labels = [_label(v, None, where) for v in ex["labels"]]
        ex["labels"] = None if any(v is None for v in labels) else labels
        ex["answers"] = [str(a) for a in ex["answers"]]
    elif task == "record":
        ex["entities"] = list(dict.fromkeys(ex["entities"]))  # unique, first occurrence kept
        ex["answers"] = sorted(set(ex["answers"]))
    return ex


def from_jsonl(task: str, records, source: str = "jsonl") -> list[dict]:
    """Normalise records in SuperGLUE's own JSONL layout (already parsed)."""
    out = []
    for i, rec in enumerate(records):
        where = f"{source} record {i}"
        if task in FIELDS:
            if task == "wsc":  # the span fields sit under "target" in the release files
                target = _get(rec, "target", where)
                fields = {"text": _get(rec, "text", where),
                          **{k: _get(target, k, where + " target") for k in FIELDS["wsc"][1:]}}
            else:
                fields = {k: _get(rec, k, where) for k in FIELDS[task]}
            fields.update(idx=rec.get("idx", i), label=rec.get("label"))
            out.append(_finish(task, fields, where))
        elif task == "multirc":
            passage = _get(rec, "passage", where)
            text = _get(passage, "text", where + " passage")
            p_idx = rec.get("idx", i)
            for q_pos, q in enumerate(_get(passage, "questions", where + " passage")):
                answers = sorted(_get(q, "answers", where), key=lambda a: a.get("idx", 0))
                fields = {"idx": f"{p_idx}-{q.get('idx', q_pos)}", "passage": text,
                          "question": _get(q, "question", where),
                          "answers": [_get(a, "text", where + " answer") for a in answers],
                          "labels": [a.get("label") for a in answers]}
                out.append(_finish(task, fields, where))
        elif task == "record":
            passage = _get(rec, "passage", where)
            text = _get(passage, "text", where + " passage")
            spans = sorted(_get(passage, "entities", where + " passage"), key=lambda e: e["start"])
            entities = [text[e["start"]:e["end"] + 1] for e in spans]  # SuperGLUE's ends are inclusive
            p_idx = rec.get("idx", i)
            for q_pos, qa in enumerate(_get(rec, "qas", where)):
                fields = {"idx": f"{p_idx}-{qa.get('idx', q_pos)}", "passage": text,
                          "query": _get(qa, "query", where + " qas"), "entities": entities,
                          "answers": [_get(a, "text", where + " answer") for a in qa.get("answers", [])]}
                out.append(_finish(task, fields, where))
        else:
            raise ValueError(f"unknown task {task!r}")
    return out


def from_hub(task: str, rows, source: str = "hub") -> list[dict]:
    """Normalise rows in the hub's flattened ``super_glue`` schema (also ``aps/super_glue``)."""
    out = []
    if task == "multirc":
        groups: dict = {}  # one row per answer option: regroup by (paragraph, question), keeping order
        for i, row in enumerate(rows):
            where = f"{source} row {i}"
            idx = _get(row, "idx", where)
            key = (idx["paragraph"], idx["question"])
            if key not in groups:
                groups[key] = {"idx": f"{key[0]}-{key[1]}", "passage": _get(row, "paragraph", where),
                               "question": _get(row, "question", where), "_opts": []}
            groups[key]["_opts"].append((idx["answer"], _get(row, "answer", where), row.get("label")))
        for key, g in groups.items():
            opts = sorted(g.pop("_opts"), key=lambda o: o[0])
            g.update(answers=[o[1] for o in opts], labels=[o[2] for o in opts])
            out.append(_finish(task, g, f"{source} question {key}"))
        return out
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if task in FIELDS:
            fields = {k: _get(row, k, where) for k in FIELDS[task]}
            fields.update(idx=row.get("idx", i), label=row.get("label"))
        elif task == "record":
            idx = _get(row, "idx", where)
            spans = row.get("entity_spans")
            if spans:  # a Sequence of dicts comes back from `datasets` as a dict of lists
                if isinstance(spans, dict):
                    spans = [dict(zip(spans, vals)) for vals in zip(*spans.values())]
                entities = [s["text"] for s in sorted(spans, key=lambda s: s["start"])]
            else:  # older exports: a set of texts with no positions; order is the file's
                entities = list(_get(row, "entities", where))
            fields = {"idx": f"{idx['passage']}-{idx['query']}", "passage": _get(row, "passage", where),
                      "query": _get(row, "query", where), "entities": entities,
                      "answers": list(row.get("answers") or [])}
        else:
            raise ValueError(f"unknown task {task!r}")
        out.append(_finish(task, fields, where))
    return out
