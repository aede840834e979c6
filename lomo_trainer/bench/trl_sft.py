"""Peak memory of ``LOMOTrainer.wrap(SFTTrainer)`` against the stock ``SFTTrainer``, side by side in one run.

Per rank; the stock trainer with ZeRO-3 AdamW (DeepSpeed's ZeRO-3 optimizer around torch's AdamW, what SFTTrainer does with a ZeRO-3 config), on
the same model, data and SFTConfig (TRL's defaults: bf16, gradient checkpointing, max_grad_norm 1.0).

    DS_ACCELERATOR=cpu python -m lomo_trainer.bench.trl_sft --preset small --seq-len 256 --batch 2 --steps 3 \\
        --world-size 2 --repeat 2

Each mode runs in fresh forked ranks (the libraries imported once, in this process), the modes alternate over
``--repeat`` rounds. The model is built from the preset under zero.Init (partitioned while it is built, as
``from_pretrained`` does with a ZeRO-3 config) with random weights; rows are random token ids of ``--seq-len``.
Peak: the rank's high-water mark from just before ``train()`` (engine, optimizer state and every step) to its end,
CUDA allocator statistics on a GPU, resident set size on CPU (bench/memstat.py); "before" is what the process held
when ``train()`` started (libraries, the partitioned model, data).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

MODES = ("lomo_sft", "adamw_sft")


def _zero3(lomo: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}
    if lomo:
        cfg["optimizer"] = {"type": "LOMO", "params": {"lr": "auto"}}
    return cfg


def _rank(rank, world, mode, cfg, seq_len, batch, steps, out):
    from .memstat import MemoryMeter, tune_malloc

    tune_malloc()
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer

    from lomo_trainer import LOMOTrainer

    torch.set_num_threads(1)
    lomo = mode == "lomo_sft"
    args = SFTConfig(output_dir=out, deepspeed=_zero3(lomo), use_cpu=not torch.cuda.is_available(),
                     per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-2 if lomo else 1e-5,
                     report_to=[], logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                     max_length=seq_len, dataset_num_proc=None)
    import deepspeed

    _ = args.device
    deepspeed.init_distributed()  # DeepSpeed's process group first: zero.Init below sizes the batch by its world
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # zero.Init: HfDeepSpeedConfig is live
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config.vocab_size, (64, seq_len), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 2, "<unk>": 3},
                                                                               unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cls = LOMOTrainer.wrap(SFTTrainer) if lomo else SFTTrainer
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok)
    meter = MemoryMeter(args.device)
    before = meter.current()
    meter.reset()
    result = trainer.train()
    peak = meter.peak()["peak"]
    return {"mode": mode, "rank": rank, "peak_mib": peak / 2**20, "before_mib": before / 2**20,
            "step_s": result.metrics["train_runtime"] / steps, "loss": result.metrics["train_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default="runs/bench_trl_sft")
    a = p.parse_args(argv)

    import deepspeed  # noqa: F401  (imported once here; the forked ranks inherit it)
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from .._zero import disable_cpu_shm_build
    from ..local_ranks import run_ranks
    from .presets import load_config

    disable_cpu_shm_build()
    name, cfg = load_config(a.preset)
    rows = []
    for round_ in range(a.repeat):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            out = os.path.join(a.out, f"{mode}_{round_}")
            ranks = run_ranks(_rank, a.world_size, mode, cfg, a.seq_len, a.batch, a.steps, out, timeout=1800)
            rows += ranks
            print(json.dumps({"round": round_, "mode": mode, "peak_mib": [round(r["peak_mib"], 1) for r in ranks],
                              "before_mib": [round(r["before_mib"], 1) for r in ranks],
                              "step_s": round(statistics.mean(r["step_s"] for r in ranks), 2)}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "trl_sft.json"), "w") as f:
        json.dump({"preset": name, "config": cfg, "args": vars(a), "rows": rows}, f, indent=1)
    print(f"\n{name}, seq {a.seq_len} x batch {a.batch}, {a.world_size} ranks, {a.steps} steps, {a.repeat} round(s)")
    print("| mode | peak MiB per rank (max over ranks, median over rounds) | before train() MiB | peak - before MiB |"
          " step s |")
    print("|---|---|---|---|---|")
    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        per_round = [max(r["peak_mib"] for r in mine[i:i + a.world_size]) for i in range(0, len(mine), a.world_size)]
        before = statistics.median(r["before_mib"] for r in mine)
        summary[mode] = statistics.median(per_round)
        print(f"| {mode} | {summary[mode]:.1f} | {before:.1f} | {summary[mode] - before:.1f} | "
              f"{statistics.median(r['step_s'] for r in mine):.2f} |")
    print(f"peak lomo_sft / adamw_sft: {summary['lomo_sft'] / summary['adamw_sft']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
