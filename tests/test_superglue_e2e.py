"""SuperGLUE end to end on CPU: zero-shot (LOMOTrainer over zero epochs), LOMO fine-tuning on 2 ZeRO-3 ranks
for two tasks in one process, LoRA on 1 rank, then `table` with one row per method.

The tiny LLaMA is random and its word-level tokenizer knows none of the fixture words: this checks the
plumbing (data, training, distributed evaluation, result files), not accuracy.
"""
import json
import os

import pytest

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "superglue", "tiny_cpu.json")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "superglue")


def superglue(rank, world, command, out, tasks, *extra):
    from lomo_trainer.superglue.cli import main

    return main([command, "--config", CONFIG, "--data-dir", FIXTURES, "--tasks", tasks, "--output_dir", out,
                 "--max_steps", "2", *extra])


def check_results(out, method, tasks, returned):
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(returned[0])), "results.json differs from what rank 0 returned"
    assert all(r["tasks"] == returned[0]["tasks"] for r in returned), "ranks disagree on the metrics"
    assert saved["method"] == method and set(saved["tasks"]) == set(tasks)
    for task, keys in tasks.items():
        metrics = saved["tasks"][task]
        assert set(keys) | {"score", "n"} <= set(metrics), metrics
        assert all(0.0 <= metrics[k] <= 1.0 for k in keys)
    assert os.path.isfile(os.path.join(out, "results.md"))
    return saved


def test_zero_shot_lomo_lora_then_table(tmp_path, monkeypatch):
    lomo, lora, zero = (str(tmp_path / m) for m in ("lomo", "lora", "zero-shot"))
    returned = run_ranks(superglue, 2, "finetune", lomo, "cb,copa")
    saved = check_results(lomo, "lomo", {"cb": ("accuracy", "f1"), "copa": ("accuracy",)}, returned)
    assert saved["tasks"]["cb"]["train_steps"] == 2 and saved["tasks"]["cb"]["n"] == 4  # the whole fixture val
    assert os.path.isfile(os.path.join(lomo, "cb", "train.jsonl"))
    assert "| tiny-llama LOMO |" in open(os.path.join(lomo, "results.md")).read()

    run_ranks(superglue, 2, "finetune", zero, "cb", "--no-train")
    assert json.load(open(os.path.join(zero, "results.json")))["tasks"]["cb"]["train_steps"] == 0

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    returned = run_ranks(superglue, 1, "lora", lora, "cb", "--report-to", "wandb", "--n-train", "2")
    saved = check_results(lora, "lora", {"cb": ("accuracy", "f1")}, returned)
    assert saved["lora"]["targets"] == ["q_proj", "v_proj"] and saved["tasks"]["cb"]["n_train"] == 2
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline wandb run was written"

    from lomo_trainer.superglue.cli import main

    md = main(["table", *(os.path.join(d, "results.json") for d in (zero, lora, lomo))])
    rows = md.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny-llama zero-shot", "| tiny-llama LoRA", "| tiny-llama LOMO"]
    assert "CB (acc/F1)" in md and "COPA (acc)" in md
    assert rows[1].split(" | ")[2] == "–", "LoRA ran CB only: its COPA cell must be empty"


def test_per_task_results_files_share_a_row(tmp_path):
    from lomo_trainer.superglue.cli import main

    paths = []
    for task, metrics in (("cb", {"accuracy": 0.5, "f1": 0.25}), ("copa", {"accuracy": 0.75})):
        path = tmp_path / f"{task}.json"
        path.write_text(json.dumps({"name": "m LOMO", "tasks": {task: {**metrics, "score": 0.5, "n": 4}}}))
        paths.append(str(path))
    md = main(["table", *paths])
    assert md.count("| m LOMO |") == 1 and "| m LOMO | 50.0/25.0 | 75.0 |" in md


def test_bad_run_config_is_one_line(tmp_path, capsys):
    from lomo_trainer.superglue.cli import main

    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"model_name_or_path": "m", "train_file": "x.jsonl", "output_dir": str(tmp_path)}))
    with pytest.raises(SystemExit):
        main(["finetune", "--config", str(bad), "--tasks", "cb"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train_file is set" in err
