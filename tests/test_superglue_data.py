"""SuperGLUE loading, normalisation (hub schema vs release JSONL), templates and training records."""
import json
from pathlib import Path

import pytest

from distributed import run_ranks
from lomo_trainer.superglue import (TASKS, from_hub, from_jsonl, get_task, instances, load_task, training_dataset,
                                    training_records)
from models import tiny_llama, word_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"
# examples per split once normalised (MultiRC: questions, ReCoRD: queries)
COUNTS = {"boolq": (3, 3), "cb": (3, 4), "copa": (2, 3), "multirc": (2, 3), "record": (1, 3), "rte": (2, 3),
          "wic": (2, 3), "wsc": (2, 2)}


def jsonl(task_dir, split="val"):
    return [json.loads(line) for line in (FIXTURES / task_dir / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_fixtures_load_for_every_task(task):
    train = load_task(task, "train", FIXTURES)
    val = load_task(task, "validation", FIXTURES)
    assert (len(train), len(val)) == COUNTS[task]
    assert load_task(task, "val", FIXTURES) == val
    for ex in train + val:
        for inst in instances(task, ex):
            assert inst.gold is not None and inst.candidates and all(c.startswith(" ") for c in inst.candidates)
    assert training_records(task, train)  # every labelled example makes a record


def test_subsample_is_seeded_ordered_and_a_subset():
    full = load_task("cb", "validation", FIXTURES)
    a = load_task("cb", "validation", FIXTURES, n=2, seed=3)
    assert a == load_task("cb", "validation", FIXTURES, n=2, seed=3)
    assert len(a) == 2 and all(x in full for x in a)
    assert [full.index(x) for x in a] == sorted(full.index(x) for x in a)
    seeds = {tuple(x["idx"] for x in load_task("cb", "validation", FIXTURES, n=2, seed=s)) for s in range(20)}
    assert len(seeds) > 1, "the seed must change the draw"
    assert load_task("cb", "validation", FIXTURES, n=100) == full


def test_cb_normalised_form():
    assert load_task("CB", "validation", FIXTURES)[1] == {
        "idx": "1", "premise": "Nobody thinks the baker moved to the coast.",
        "hypothesis": "the baker moved to the coast", "label": 1}


# Hub rows written by hand in the flattened `super_glue` schema, equivalent to the fixtures' val files.
HUB = {
    "boolq": [{"question": "is the quarn festival held in winter", "passage": "Quarn Festival -- The festival takes place every summer on the longest day.", "idx": 0, "label": 0}],
    "cb": [{"premise": "Nobody thinks the baker moved to the coast.", "hypothesis": "the baker moved to the coast", "idx": 1, "label": 1}],
    "copa": [{"premise": "The road was covered in snow.", "choice1": "The plough came through.", "choice2": "It had snowed overnight.", "question": "cause", "idx": 0, "label": 1}],
    "rte": [{"premise": "The orchestra cancelled its winter tour because of illness.", "hypothesis": "The orchestra toured in winter.", "idx": 1, "label": 1}],
    "wic": [{"word": "cold", "sentence1": "The soup is cold.", "sentence2": "A cold wind blew.", "start1": 12, "start2": 2, "end1": 16, "end2": 6, "idx": 1, "label": 1}],
    "wsc": [{"text": "The cup fell off the shelf because it was slippery.", "span1_index": 4, "span2_index": 7, "span1_text": "the shelf", "span2_text": "it", "idx": 1, "label": 0}],
}
JSONL_POS = {"boolq": 0, "cb": 1, "copa": 0, "rte": 1, "wic": 1, "wsc": 1}


@pytest.mark.parametrize("task", sorted(HUB))
def test_hub_and_jsonl_normalise_the_same_flat_tasks(task):
    line = jsonl(get_task(task).dirname)[JSONL_POS[task]]
    assert from_hub(task, HUB[task]) == from_jsonl(task, [line])


def test_hub_and_jsonl_normalise_the_same_multirc():
    # one hub row per answer option, deliberately out of order: normalisation regroups and sorts them
    p = "<b>Sent 1: </b>Otto baked bread on Sundays.<br><b>Sent 2: </b>His neighbours bought most of it.<br>"
    rows = [{"paragraph": p, "question": "Who bought the bread?", "answer": "Otto", "idx": {"paragraph": 1, "question": 0, "answer": 1}, "label": 0},
            {"paragraph": p, "question": "Who bought the bread?", "answer": "His neighbours", "idx": {"paragraph": 1, "question": 0, "answer": 0}, "label": 1}]
    expected = {"idx": "1-0", "passage": p, "question": "Who bought the bread?", "answers": ["His neighbours", "Otto"], "labels": [1, 0]}
    assert from_hub("multirc", rows) == [expected]
    assert from_jsonl("multirc", [jsonl("MultiRC")[1]]) == [expected]


def test_hub_and_jsonl_normalise_the_same_record():
    text = ("Tam Valley Railway will close in May, Otto Lind said.\n@highlight\nRailway to close\n@highlight\n"
            "Otto Lind confirms")
    row = {"passage": text, "query": "The @placeholder has carried passengers for a century.",
           "entities": ["May", "Otto Lind", "Tam Valley Railway"],  # the hub's set: any order
           "entity_spans": {"text": ["Otto Lind", "Tam Valley Railway", "May"], "start": [38, 0, 33], "end": [46, 17, 35]},
           "answers": ["Tam Valley Railway"], "idx": {"passage": 1, "query": 0}}
    expected = {"idx": "1-0", "passage": text, "query": "The @placeholder has carried passengers for a century.",
                "entities": ["Tam Valley Railway", "May", "Otto Lind"], "answers": ["Tam Valley Railway"]}
    assert from_hub("record", [row]) == [expected]
    assert from_jsonl("record", [jsonl("ReCoRD")[1]]) == [expected]


def test_unlabelled_hub_rows():
    row = dict(HUB["cb"][0], label=-1)
    assert from_hub("cb", [row])[0]["label"] is None
    with pytest.raises(ValueError, match="no label"):
        training_records("cb", from_hub("cb", [row]))


def test_templates_produce_documented_strings():
    val = {t: load_task(t, "validation", FIXTURES) for t in TASKS}
    (inst,) = instances("boolq", val["boolq"][0])
    assert inst == ("Quarn Festival -- The festival takes place every summer on the longest day.\n"
                    "Question: is the quarn festival held in winter?\nAnswer:", [" No", " Yes"], 0)
    assert instances("boolq", val["boolq"][1])[0].context.endswith("brindlewood a type of tree?\nAnswer:")  # no "??"
    assert instances("cb", val["cb"][2])[0] == (
        "Perhaps the letters were burned, Jon wondered.\nQuestion: the letters were burned True, False, or Neither?\n"
        "Answer:", [" True", " False", " Neither"], 2)
    assert instances("copa", val["copa"][0])[0] == (
        "The road was covered in snow because", [" the plough came through.", " it had snowed overnight."], 1)
    assert instances("copa", val["copa"][1])[0].context == "The boy forgot his umbrella so"
    assert instances("rte", val["rte"][1])[0] == (
        "The orchestra cancelled its winter tour because of illness.\nQuestion: The orchestra toured in winter. "
        "True or False?\nAnswer:", [" True", " False"], 1)
    assert instances("wic", val["wic"][1])[0] == (
        'Does the word "cold" have the same meaning in these two sentences?\nThe soup is cold.\nA cold wind blew.\n'
        "Answer:", [" No", " Yes"], 1)
    assert instances("wsc", val["wsc"][0])[0] == (
        "Ada thanked Bea because she had fixed the fence.\nQuestion: In the passage above, does the pronoun \"she\" "
        "refer to \"Bea\"?\nAnswer:", [" No", " Yes"], 1)
    options = instances("multirc", val["multirc"][0])
    assert [o.gold for o in options] == [1, 0, 1]
    assert options[1].context == (
        "<b>Sent 1: </b>The lighthouse keeper climbed the stairs every evening.<br><b>Sent 2: </b>He lit the lamp at "
        "sunset.<br>\nQuestion: When did the keeper light the lamp?\nCandidate answer: At dawn\n"
        "Is the candidate answer correct?\nAnswer:")
    (rec,) = instances("record", val["record"][1])
    assert rec.context == ("The mayor of Brindle, Ida Holm, opened the new library on Monday.\n- Ida Holm opens "
                           "library\n- Brindle celebrates")
    assert rec.candidates == [" Brindle cut the ribbon herself.", " Ida Holm cut the ribbon herself.",
                              " Monday cut the ribbon herself."]
    assert rec.gold == (1,)


def test_training_records_are_prompt_plus_gold():
    recs = training_records("copa", load_task("copa", "train", FIXTURES))
    assert recs == [{"prompt": "The kettle whistled because", "completion": " the water was boiling."},
                    {"prompt": "The girl dropped her ice cream so", "completion": " she started to cry."}]
    recs = training_records("multirc", load_task("multirc", "train", FIXTURES))
    assert [r["completion"] for r in recs] == [" Yes", " No", " Yes", " No", " Yes"]
    (rec,) = training_records("record", load_task("record", "train", FIXTURES))
    assert rec["completion"] == " Quarn City are now top of the league."


def test_training_dataset_masks_the_prompt_and_ends_with_eos():
    tok, v = word_tokenizer("the kettle whistled because water was boiling. girl dropped her ice cream so she "
                            "started to cry.".split())
    data = training_dataset("copa", load_task("copa", "train", FIXTURES)[:1], tok, max_length=512)
    prompt = [1, v["<unk>"], v["kettle"], v["whistled"], v["because"]]  # "The" is not in the vocabulary
    completion = [v["the"], v["water"], v["was"], v["boiling."], 2]
    assert data[0]["input_ids"] == prompt + completion and data[0]["labels"] == [-100] * 5 + completion
    cut = training_dataset("copa", load_task("copa", "train", FIXTURES)[:1], tok, max_length=6)
    assert cut[0]["input_ids"] == [v["because"]] + completion  # the prompt loses its start, as in scoring


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown SuperGLUE task 'glue'"):
        load_task("glue", "train", FIXTURES)
    with pytest.raises(FileNotFoundError, match="CB/val.jsonl"):
        load_task("cb", "validation", tmp_path)
    (tmp_path / "CB").mkdir()
    (tmp_path / "CB" / "val.jsonl").write_text(json.dumps({"premise": "p", "label": "neutral", "idx": 0}) + "\n")
    with pytest.raises(ValueError, match="missing field 'hypothesis'"):
        load_task("cb", "validation", tmp_path)
    (tmp_path / "CB" / "val.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        load_task("cb", "validation", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_task("cb", "dev", FIXTURES)


def superglue_main(rank, world, *argv):
    from lomo_trainer.superglue.cli import main

    return main(list(argv))


@pytest.mark.multirank
def test_zero_shot_cli_writes_json_markdown_and_offline_wandb(tmp_path, monkeypatch):
    from lomo_trainer.superglue.cli import main

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer("the a is of".split())[0].save_pretrained(model_dir)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    # in a forked rank: the run's process group and world-of-one environment stay out of this pytest process
    (results,) = run_ranks(superglue_main, 1, "zero-shot", "--model", str(model_dir), "--data-dir", str(FIXTURES),
                           "--tasks", "CB,record,multirc", "--n", "2", "--output-dir", str(out), "--report-to", "wandb",
                           "--batch-size", "4")
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["tasks"]) == {"cb", "record", "multirc"}
    assert saved["tasks"]["cb"]["n"] == 2 and set(saved["tasks"]["multirc"]) >= {"f1a", "em", "score"}
    assert (out / "results.md").read_text().splitlines()[2].startswith("| tiny zero-shot | ")
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline wandb run was written"
    md = main(["table", str(out / "results.json"), str(out / "results.json"), "--output", str(tmp_path / "t.md")])
    assert md.count("| tiny zero-shot |") == 2 and (tmp_path / "t.md").read_text() == md
    with pytest.raises(SystemExit):
        main(["zero-shot", "--model", str(model_dir), "--tasks", "nope"])


def test_hub_path_asks_for_the_right_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return HUB["wsc"] if config.startswith("wsc") else HUB["cb"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_task("cb", "val") == from_jsonl("cb", [jsonl("CB")[1]])
    load_task("WSC", "train", hub_repo="aps/super_glue")
    assert calls == [("super_glue", "cb", "validation"), ("aps/super_glue", "wsc.fixed", "train")]


@pytest.mark.parametrize("max_length", [512, 9])
def test_scored_sequences_are_the_trained_ones(tmp_path, max_length):
    """Every gold candidate is scored on exactly the tokens its training example holds: same EOS, same cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from lomo_trainer.data import IGNORE_INDEX, build_datasets
    from lomo_trainer.ranking import _build_items

    records = training_records("rte", load_task("rte", "train", FIXTURES)) + \
        training_records("copa", load_task("copa", "train", FIXTURES))
    words = sorted({w for r in records for w in (r["prompt"] + r["completion"]).split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    trained = build_datasets(tok, train_file=str(path), max_length=max_length)["train"]
    items = _build_items(tok, [(r["prompt"], [r["completion"]]) for r in records], max_length, add_eos=True)
    assert len(trained) == len(items)
    for row, (_, _, ctx, cont) in zip(trained, items):
        assert row["input_ids"] == ctx + cont and cont[-1] == 2
        assert row["labels"] == [IGNORE_INDEX] * len(ctx) + cont
    assert max_length > 100 or any(len(ctx) < 5 for *_, ctx, _ in items), "the short max_length must cut"
