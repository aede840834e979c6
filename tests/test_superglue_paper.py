"""--protocol paper: each prompt pinned character for character on a fixture example of each task.

The expected strings are written by hand from reading the LOMO paper's code (OpenLMLab/LOMO,
lomo/src/mydatasets.py get_dataset_info / process_record / MyDataset.process, lomo/src/prompts.py
Question._get_prompt and Exemplar.get_brown_prompt / get_natural_prompt): every part is followed by "\n",
"brown" prompts end "Answer: ", COPA's "natural" prompt is its part with the newline stripped.
"""
from pathlib import Path

import pytest

from lomo_trainer.superglue import load_task
from lomo_trainer.superglue.paper import encode, instances, units

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


def val(task, i=0):
    return load_task(task, "validation", FIXTURES)[i]


def test_boolq_prompt():
    (inst,) = instances("boolq", val("boolq"))
    assert inst.context == ("Quarn Festival -- The festival takes place every summer on the longest day. "
                            "is the quarn festival held in winter\nAnswer: ")
    assert inst.candidates == ["No", "Yes"] and inst.gold == 0


def test_rte_prompt():
    (inst,) = instances("rte", val("rte"))
    assert inst.context == ("Farmers near Brindle harvested a record crop of barley this year.\n"
                            "Does this mean that \"Barley is grown near Brindle.\" is true? Yes or No?\nAnswer: ")
    assert inst.candidates == ["Yes", "No"] and inst.gold == 0  # entailment -> Yes


def test_wic_prompt():
    (inst,) = instances("wic", val("wic"))
    assert inst.context == ("Does the word \"run\" have the same meaning in these two sentences? Yes, No?\n"
                            "I run every morning.\nShe will run the shop while I am away.\nAnswer: ")
    assert inst.candidates == ["No", "Yes"] and inst.gold == 0


def test_wsc_prompt_keeps_the_papers_spelling():
    (inst,) = instances("wsc", val("wsc"))
    assert inst.context == ("Ada thanked Bea because she had fixed the fence.\nIn the previous sentence, does the "
                            "pronuon \"she\" refer to \"Bea\"? Yes or No?\nAnswer: ")
    assert inst.candidates == ["No", "Yes"] and inst.gold == 1


def test_copa_prompt_keeps_full_stop_and_capital():
    (inst,) = instances("copa", val("copa"))
    assert inst.context == "The road was covered in snow. because "
    assert inst.candidates == ["The plough came through.", "It had snowed overnight."] and inst.gold == 1
    assert instances("copa", val("copa", 1))[0].context == "The boy forgot his umbrella. so "


def test_multirc_prompt_and_unit_is_the_answer_option():
    options = units("multirc", load_task("multirc", "validation", FIXTURES))
    assert len(options) == 7 and all(len(o["answers"]) == 1 for o in options)
    (inst,) = instances("multirc", options[1])
    assert inst.context == ("<b>Sent 1: </b>The lighthouse keeper climbed the stairs every evening.<br><b>Sent 2: "
                            "</b>He lit the lamp at sunset.<br>\nQuestion: When did the keeper light the lamp?\n"
                            "I found this answer \"At dawn\". Is that correct? Yes or No?\nAnswer: ")
    assert inst.candidates == ["No", "Yes"] and inst.gold == 0


def test_record_prompt_scores_only_the_entity():
    (inst,) = instances("record", val("record", 2))
    assert inst.context == ("Tam Valley Railway will close in May, Otto Lind said.\n- Railway to close\n- Otto Lind "
                            "confirms\nThe @placeholder has carried passengers for a century.\n"
                            "Question: What is the \"@placeholder\"?\nAnswer: ")
    assert inst.candidates == ["May", "Otto Lind", "Tam Valley Railway"] and inst.gold == 2  # the sorted set


def test_record_candidate_and_gold_rules():
    ex = {"idx": "x", "passage": "p", "query": "@placeholder q", "entities": ["Zed", "Ada", "Bo", "Ada", "Cy"],
          "answers": ["Ada", "Cy"]}
    (inst,) = instances("record", ex)
    assert inst.candidates == ["Ada", "Bo", "Zed"] and inst.gold == 0  # the other gold (Cy) is dropped
    with pytest.raises(ValueError, match="not a passage entity"):
        instances("record", {**ex, "answers": ["Nobody"]})


def test_cb_is_refused():
    with pytest.raises(ValueError, match="no 'cb'"):
        instances("cb", val("cb"))


class CharTokenizer:
    """One id per character after a BOS (1); EOS is 2: enough to check the masking arithmetic."""
    eos_token_id, bos_token_id, pad_token_id = 2, 1, 0

    def __call__(self, text, truncation=False, max_length=None):
        ids = [1] + [ord(c) for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_encode_is_the_papers_masking_and_right_cut():
    ctx, target = encode(CharTokenizer(), "Answer: ", "Yes", 1024)
    # labels[:len(encode(source)) - 1] are masked: the source's last token is a target too
    assert ctx == [1] + [ord(c) for c in "Answer:"] and target == [ord(c) for c in " Yes"] + [2]
    ctx, target = encode(CharTokenizer(), "Answer: ", "Yes", 6)  # cut from the right, then EOS
    assert ctx + target == [1] + [ord(c) for c in "Answe"] + [2] and target == []
