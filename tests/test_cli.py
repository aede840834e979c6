"""The README's first command, shortened: lomo-train on the shipped default config, 2 ZeRO-3 CPU ranks."""
import json
import os

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_default(rank, world, out):
    from lomo_trainer.cli import main

    return main([os.path.join(ROOT, "configs", "default_cpu.json"), "--output_dir", out, "--max_steps", "12",
                 "--max_eval_samples", "40", "--report_to", "none", "--disable_tqdm", "true"])


def test_default_run_trains_saves_and_evaluates(tmp_path):
    out = str(tmp_path / "run")
    assert run_ranks(run_default, 2, out) == [0, 0]
    result = json.load(open(os.path.join(out, "eval_results.json")))
    assert 0.0 <= result["choice_accuracy"] <= 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("review: great fun sentiment:", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
