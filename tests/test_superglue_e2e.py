"""SuperGLUE end to end on CPU: zero-shot (LOMOTrainer over zero epochs), LOMO fine-tuning on 2 ZeRO-3 ranks
for two tasks in one process, LoRA on 1 rank, then `table` with one row per method; zero-shot --model against
zero-shot --config on the same weights.

The shipped tiny LLaMA is random and its word-level tokenizer knows none of the fixture words: this checks the
plumbing (data, training, distributed evaluation, result files), not accuracy.
"""
import glob
import json
import os

import pytest

from distributed import run_ranks
from models import tiny_llama, word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "superglue", "tiny_cpu.json")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "superglue")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


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


@pytest.mark.multirank
def test_zero_shot_lomo_lora_lomo_lora_then_table(tmp_path, monkeypatch):
    lomo, lora, zero = (str(tmp_path / m) for m in ("lomo", "lora", "zero-shot"))
    returned = run_ranks(superglue, 2, "finetune", lomo, "cb,copa")
    saved = check_results(lomo, "lomo", {"cb": ("accuracy", "f1"), "copa": ("accuracy",)}, returned)
    assert saved["tasks"]["cb"]["train_steps"] == 2 and saved["tasks"]["cb"]["n"] == 4  # the whole fixture val
    assert not os.path.exists(os.path.join(lomo, "cb", "train.jsonl")), "records stay in memory"
    cb = saved["tasks"]["cb"]
    # evaluated after every epoch (eval_strategy epoch through the Trainer): best and last kept, last = final model
    assert len(cb["epochs"]) >= 1 and cb["selected"] == "last" and cb["last"]["step"] == cb["train_steps"]
    assert cb["best"]["score"] == max(e["score"] for e in cb["epochs"]) and cb["accuracy"] == cb["last"]["accuracy"]
    assert "| tiny-llama LOMO |" in open(os.path.join(lomo, "results.md")).read()

    run_ranks(superglue, 2, "zero-shot", zero, "cb")
    assert json.load(open(os.path.join(zero, "results.json")))["tasks"]["cb"]["train_steps"] == 0
    assert json.load(open(os.path.join(zero, "results.json")))["tasks"]["cb"]["epochs"][0]["step"] == 0

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    returned = run_ranks(superglue, 1, "lora", lora, "cb", "--report-to", "wandb", "--n-train", "2",
                         "--lora", json.dumps(LORA), "--learning_rate", "5e-4")
    saved = check_results(lora, "lora", {"cb": ("accuracy", "f1")}, returned)
    assert saved["lora"]["target_modules"] == ["q_proj", "v_proj"] and saved["lora"]["lr"] == 5e-4
    assert saved["tasks"]["cb"]["n_train"] == 2
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline wandb run was written"

    # LOMO + LoRA on 2 ZeRO-3 ranks: the run config's lora block (here given on the command line) with its optimizer
    lomo_lora = str(tmp_path / "lomo-lora")
    block = {**LORA, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    returned = run_ranks(superglue, 2, "finetune", lomo_lora, "cb", "--method", "lomo-lora", "--lora", json.dumps(block))
    saved = check_results(lomo_lora, "lomo-lora", {"cb": ("accuracy", "f1")}, returned)
    assert saved["lora"]["lr"] == 1e-3 and saved["learning_rate"] == 0.03 and saved["tasks"]["cb"]["train_steps"] == 2

    from lomo_trainer.superglue.cli import main

    md = main(["table", *(os.path.join(d, "results.json") for d in (zero, lora, lomo, lomo_lora))])
    rows = md.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny-llama zero-shot", "| tiny-llama LoRA", "| tiny-llama LOMO",
                                                 "| tiny-llama LOMO+LoRA"]
    assert "CB (acc/F1)" in md and "COPA (acc)" in md
    assert rows[1].split(" | ")[2] == "–", "LoRA ran CB only: its COPA cell must be empty"


def fixture_model(path) -> str:
    """A random tiny LLaMA saved with a tokenizer that knows every fixture word, so that candidates score apart,
    and 24 positions, so that its longer prompts are cut (fixture prompts have 8 to 37 words)."""

    def strings(x):
        if isinstance(x, str):
            yield x
        for v in x.values() if isinstance(x, dict) else x if isinstance(x, list) else ():
            yield from strings(v)

    words = sorted({w for f in glob.glob(os.path.join(FIXTURES, "*", "*.jsonl")) for line in open(f)
                    for text in strings(json.loads(line)) for w in text.split()})
    tokenizer, vocab = word_tokenizer(words)
    tokenizer.save_pretrained(path)
    model = tiny_llama(vocab=len(vocab))
    model.config.max_position_embeddings = 24  # zero-shot --model's default max_length
    model.save_pretrained(path)
    return str(path)


def zero_shot(rank, world, *argv):
    """zero-shot on every fixture example: (results, every candidate's log-likelihood in scoring order)."""
    from lomo_trainer.superglue import evaluation
    from lomo_trainer.superglue.cli import main

    scores, score_pairs = [], evaluation.score_pairs

    def recorded(*args, **kwargs):  # patched in this forked rank only
        logprob = score_pairs(*args, **kwargs)
        scores.extend(logprob)
        return logprob

    evaluation.score_pairs = recorded
    return main(["zero-shot", "--data-dir", FIXTURES, "--n", "-1", *argv]), scores


@pytest.mark.multirank
def test_zero_shot_model_and_config_are_one_path(tmp_path):
    """--model (a run config from its flags: no DeepSpeed, here 2 ranks sharing the candidates) and --config
    (ZeRO-3 on 1 rank) with the same weights and max_length: the same header fields, the same log-likelihood for
    every candidate (up to float rounding: other batches) and the same metrics."""
    from lomo_trainer.superglue.evaluation import task_metrics

    model = fixture_model(tmp_path / "model")
    ranks = run_ranks(zero_shot, 2, "--model", model, "--output-dir", str(tmp_path / "model-run"))
    assert ranks[0] == ranks[1], "ranks disagree"
    by_model, model_scores = ranks[0]
    ((by_config, config_scores),) = run_ranks(zero_shot, 1, "--config", CONFIG, "--model_name_or_path", model,
                                              "--init_from_scratch", "false", "--max_length", "24",
                                              "--output_dir", str(tmp_path / "config-run"))
    assert set(by_model) == set(by_config) and by_model["method"] == by_config["method"] == "zero-shot"
    assert by_model["name"] == by_config["name"] == "model zero-shot" and by_model["learning_rate"] is None
    assert set(by_model["tasks"]) == set(by_config["tasks"]) == {"boolq", "cb", "copa", "multirc", "record", "rte",
                                                                 "wic", "wsc"}
    assert len(model_scores) == len(config_scores) > 50 and model_scores == pytest.approx(config_scores, rel=1e-5)
    for task, r in by_model["tasks"].items():
        keys = (*task_metrics(task, "standard"), "score", "n", "epoch", "step", "train_steps")
        assert {k: r[k] for k in keys} == {k: by_config["tasks"][task][k] for k in keys}, task


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


@pytest.mark.parametrize("command,extra,message", [
    (["finetune"], ["--lora", json.dumps(LORA)], "has a lora block: run finetune --method lomo-lora"),
    (["finetune", "--method", "lomo-lora"], [], "has no lora block: use configs/superglue/<size>_lomo_lora_8x3090.json"),
    (["lora"], [], "has no lora block: use configs/superglue/<size>_lora_8x3090.json"),
    (["lora"], ["--lora", json.dumps({**LORA, "optimizer": {"type": "AdamW"}})], "lora.optimizer is LOMO\\+LoRA's"),
])
def test_method_and_lora_block_must_agree(capsys, command, extra, message):
    """The method says what trains; the run config's lora block must agree, or one line before any work."""
    import re

    from lomo_trainer.superglue.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--config", CONFIG, "--tasks", "cb", "--data-dir", FIXTURES, *extra])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "superglue", "*_8x3090.json"))))
def test_shipped_configs_name_their_method(path):
    """One config per size and method: a lora block exactly in the LoRA ones, its optimizer only in LOMO+LoRA's."""
    cfg = json.load(open(path))
    method = os.path.basename(path).split("_", 1)[1].rsplit("_", 1)[0]
    assert ("lora" in cfg) == (method != "lomo"), path
    assert ("optimizer" in cfg.get("lora", {})) == (method == "lomo_lora"), path
    assert cfg["learning_rate"] == (5e-4 if method == "lora" else 0.03), path


@pytest.mark.multirank
def test_paper_protocol_runs_and_never_shares_a_column(tmp_path):
    """--protocol paper: accuracy only, the best epoch on top, the protocol named in the results and the name."""
    paper = str(tmp_path / "paper")
    (saved,) = run_ranks(superglue, 1, "finetune", paper, "multirc,record", "--protocol", "paper",
                         "--num_train_epochs", "2", "--max_steps", "-1")
    assert saved["protocol"] == "paper" and saved["name"] == "tiny-llama LOMO (paper)"
    for task in ("multirc", "record"):
        r = saved["tasks"][task]
        assert r["selected"] == "best" and set(r) >= {"accuracy", "best", "last", "epochs"} and "f1" not in r
        assert len(r["epochs"]) == 2 and r["accuracy"] == r["best"]["accuracy"]
    assert saved["tasks"]["multirc"]["n"] == 7  # answer options (3 + 2 + 2), not the 3 questions
    from lomo_trainer.superglue.cli import main

    standard = tmp_path / "standard.json"
    standard.write_text(json.dumps({"name": "tiny-llama LOMO", "tasks": {"multirc": {"f1a": 0.5, "em": 0.25, "score": 0.375}}}))
    md = main(["table", str(standard), os.path.join(paper, "results.json")])
    header = md.splitlines()[0]
    assert "MultiRC (F1a/EM)" not in header and "MultiRC standard (F1a/EM)" in header and "MultiRC paper (acc)" in header
    assert md.splitlines()[2].split(" | ")[2] == "–" and md.splitlines()[3].split(" | ")[1] == "–"
    with pytest.raises(SystemExit):
        main(["finetune", "--config", CONFIG, "--tasks", "cb", "--protocol", "paper"])  # the paper's code has no CB


def doc_commands():
    """The command lines of docs/superglue.md, as written there."""
    section = open(os.path.join(ROOT, "docs", "superglue.md")).read()
    return [line.strip().split("  #")[0].strip() for line in section.splitlines()
            if line.strip().startswith("python -m lomo_trainer.superglue")]


def run_plain(cmd: str, *extra: str):
    """A docs/superglue.md command line as one plain process: no launcher, no rank variables (DeepSpeed must not fall back
    to MPI discovery, mpi4py); "python" is this interpreter."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *cmd.split()[1:], *extra], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_readme_cpu_command_runs_as_one_plain_process(tmp_path):
    (cmd,) = [c for c in doc_commands() if "tiny_cpu.json" in c and " finetune " in c]
    run_plain(cmd, "--output_dir", str(tmp_path), "--max_steps", "1")
    saved = json.load(open(tmp_path / "results.json"))
    assert set(saved["tasks"]) == {"cb", "copa"} and saved["protocol"] == "standard"


@pytest.mark.slow
def test_readme_zero_shot_model_command_runs_as_one_plain_process(tmp_path):
    (cmd,) = [c for c in doc_commands() if " zero-shot --model " in c]
    cmd = cmd.replace("PATH", fixture_model(tmp_path / "model")).replace("[--data-dir DIR]", f"--data-dir {FIXTURES}")
    run_plain(cmd, "--output-dir", str(tmp_path / "out"))
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert set(saved["tasks"]) == {"boolq", "cb", "copa"} and saved["name"] == "model zero-shot"
