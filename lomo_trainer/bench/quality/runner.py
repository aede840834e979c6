"""Runner: the data and the model prepared once, then every run (zero-shot, lr sweeps, seeds) in its own process.

Each run is a forked child of a parent that imported everything but never computed with torch (so the fork is
safe and costs no import time); a child's peak resident memory (``VmHWM``) is that run's peak memory. Results
are appended to ``results.jsonl`` as each run ends, and a rerun skips the runs already there, so a cut-short
benchmark resumes where it stopped.

Protocol: every lr of a row's grid is trained with seed 0; the lr with the lowest final *dev* loss is then
trained again with each further seed. Every run reports the held-out *test* loss and multiple-choice accuracy
(dev picks the lr, test is what is reported). A seed fixes the training examples and their order, so all rows
of one seed see the same batches (each run records a fingerprint of the token ids it was fed, to check that).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the parent tokenises, children are forked after


@dataclass
class Settings:
    out: str = "outputs/quality"
    cache: str = ".cache/quality"
    steps: int = 16
    batch: int = 8
    eval_every: int = 4
    dev_items: int = 24
    test_items: int = 64
    mc_items: int = 64
    n_choices: int = 4
    seeds: tuple[int, ...] = (0, 1)
    max_length: int = 64
    warmup_steps: int = 2
    threads: int = 0                # 0: torch's default (all cores)
    variants: tuple[str, ...] = ()  # empty: all, in variants.ORDER
    data_seed: int = 0              # the split and the multiple-choice distractors


class Shared:
    """What every child needs, prepared in the parent: tokenizer, encoded splits, questions."""

    def __init__(self, s: Settings, model_dir: str):
        from transformers import AutoTokenizer

        from .data import build, multiple_choice
        from .scoring import encode_examples

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        splits = build(seed=s.data_seed)
        self.sizes = {k: len(v) for k, v in splits.items()}
        self.train_items = splits["train"]
        self.train = encode_examples(self.tokenizer, splits["train"], s.max_length)
        self.dev = encode_examples(self.tokenizer, splits["dev"][:s.dev_items], s.max_length)
        self.test = encode_examples(self.tokenizer, splits["test"][:s.test_items], s.max_length)
        self.questions = multiple_choice(splits["test"], s.n_choices, seed=s.data_seed)[:s.mc_items]
        self.pad_id = self.tokenizer.pad_token_id


class FingerprintCollator:
    """Pads like lomo_trainer.data.CausalLMCollator and hashes every batch it is asked for."""

    def __init__(self, tokenizer):
        from ...data import CausalLMCollator

        self.inner = CausalLMCollator(tokenizer)
        self.sha = hashlib.sha1()
        self.label_tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.sha.update(batch["input_ids"].numpy().tobytes())
        self.label_tokens += int((batch["labels"] != -100).sum())
        return batch


def _mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def train_subset(shared: Shared, s: Settings, seed: int) -> list[dict]:
    """The steps x batch training rows of ``seed``, in the order they are fed (a seeded shuffle)."""
    import random

    from .scoring import train_features

    order = list(range(len(shared.train)))
    random.Random(1000 + seed).shuffle(order)
    return train_features([shared.train[i] for i in order[:s.steps * s.batch]])


def _child(spec: dict, s: Settings, shared: Shared, conn) -> None:
    try:
        conn.send(_run(spec, s, shared))
    except BaseException as e:  # report, never hang the parent
        conn.send({**spec, "status": f"error: {type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


def _run(spec: dict, s: Settings, shared: Shared) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    from .scoring import heldout_loss, mc_accuracy
    from .variants import build_trainer

    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(spec["seed"])
    start_mib = _mib("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(shared.model_dir, dtype=torch.float32)
    result = dict(spec, status="ok", start_mib=round(start_mib, 1))
    curve = [(0, None)]

    t0 = time.time()
    if spec["variant"] != "zero_shot":
        class DevCurve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % s.eval_every == 0 or state.global_step == s.steps:
                    curve.append((state.global_step, heldout_loss(model, shared.dev, pad_id=shared.pad_id)))

        collator = FingerprintCollator(shared.tokenizer)
        train = train_subset(shared, s, spec["seed"])
        with tempfile.TemporaryDirectory() as tmp:
            kwargs = dict(output_dir=tmp, per_device_train_batch_size=s.batch, max_steps=s.steps,
                          lr_scheduler_type="linear", warmup_steps=s.warmup_steps, weight_decay=0.0,
                          logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"], use_cpu=True,
                          disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
            trainer = build_trainer(spec["variant"], model, kwargs, spec["lr"], train, collator, [DevCurve()])
            trainer._get_train_sampler = lambda *a, **k: SequentialSampler(train)  # the seed's order, same for all
            trainer.train()
            model = trainer.model
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.update(train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None,
                      fingerprint=collator.sha.hexdigest()[:12], label_tokens=collator.label_tokens,
                      train_s=round(time.time() - t0, 1))
    else:
        curve[0] = (0, heldout_loss(model, shared.dev, pad_id=shared.pad_id))
    result["dev_curve"] = [(k, v) for k, v in curve if v is not None]
    result["dev_loss"] = result["dev_curve"][-1][1]
    result["test_loss"] = heldout_loss(model, shared.test, pad_id=shared.pad_id)
    result["mc_acc"] = mc_accuracy(model, shared.tokenizer, shared.questions, max_length=s.max_length)
    result["peak_mib"] = round(_mib("VmHWM"), 1)
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def _fork(target, *args):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        out = None
    p.join()
    if out is None:
        out = {"status": f"error: the run's process died (exit code {p.exitcode}; out of memory?)"}
    return out


def _prepare_model(cache: str, conn) -> None:
    from .model import ensure_hf_folder

    try:
        conn.send({"dir": ensure_hf_folder(cache)})
    except BaseException as e:
        conn.send({"status": f"error: {type(e).__name__}: {e}"})


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _best_lr(results: list[dict], variant: str, lrs, seed: int):
    """The grid lr whose seed run has the lowest final dev loss (a failed or non-finite run ranks last)."""
    def dev(lr):
        r = next((r for r in results if r["variant"] == variant and r["lr"] == lr and r["seed"] == seed), None)
        v = r.get("dev_loss") if r and r.get("status") == "ok" else None
        return v if v is not None and math.isfinite(v) else math.inf
    return min(lrs, key=dev)


def main(s: Settings) -> str:
    """Run everything not yet in ``<out>/results.jsonl``; write ``<out>/report.md``; return its path."""
    from . import report
    from .variants import ORDER, VARIANTS

    os.makedirs(s.out, exist_ok=True)
    path = os.path.join(s.out, "results.jsonl")
    t_start = time.time()
    got = _fork(_prepare_model, s.cache)
    if "dir" not in got:
        raise SystemExit(f"quality: the model could not be prepared: {got['status']}")
    # Import what the children use once, here, so no child pays for it (no torch computation in the parent).
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lomo_trainer.trainer  # noqa: F401

    shared = Shared(s, got["dir"])
    print(f"quality: splits {shared.sizes}; {len(shared.dev)} dev / {len(shared.test)} test examples, "
          f"{len(shared.questions)} questions x {s.n_choices}; {s.steps} steps x batch {s.batch}", flush=True)
    with open(os.path.join(s.out, "settings.json"), "w") as f:
        json.dump({**asdict(s), "splits": shared.sizes}, f, indent=1)

    results = _load(path)

    def run(variant, lr, seed):
        key = (variant, lr, seed)
        done = next((r for r in results if (r["variant"], r["lr"], r["seed"]) == key), None)
        if done is not None:
            return done
        t = time.time()
        r = _fork(_child, {"variant": variant, "lr": lr, "seed": seed}, s, shared)
        r.update(variant=variant, lr=lr, seed=seed)
        results.append(r)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"quality: {variant} lr={lr} seed={seed}: {r['status']} dev {r.get('dev_loss')} test "
              f"{r.get('test_loss')} mc {r.get('mc_acc')} peak {r.get('peak_mib')} MiB ({time.time() - t:.0f} s, "
              f"{(time.time() - t_start) / 60:.1f} min in all)", flush=True)
        return r

    run("zero_shot", None, s.seeds[0])
    for name in (s.variants or ORDER):
        v = VARIANTS[name]
        for lr in v.lrs:
            run(name, lr, s.seeds[0])
        best = _best_lr(results, name, v.lrs, s.seeds[0])
        for seed in s.seeds[1:]:
            run(name, best, seed)
    out = report.write(s, results)
    print(f"quality: done in {(time.time() - t_start) / 60:.1f} min; report: {out}", flush=True)
    return out
