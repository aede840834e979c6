"""How many parameters DeepSpeed ZeRO-3 holds gathered right after forward, per zero_optimization setting.

    DS_ACCELERATOR=cpu python scripts/probe_gathered.py --preset medium \
        '{}' '{"stage3_max_reuse_distance": 0}' '{"stage3_max_reuse_distance": 1e8, "stage3_prefetch_bucket_size": 0}'

Two forked CPU ranks (gloo), bf16, random weights; three fwd+bwd steps, counted after the last forward (the
trace is complete from the second step on), next to the planner's ``gathered_parameters``. The figures in
docs/benchmarks.md ("What ZeRO-3 keeps gathered") come from this script.
"""
import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _probe(rank, world, preset, settings, seq_len):
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaForCausalLM

    from lomo_trainer import _zero
    from lomo_trainer.llama_shapes import PRESETS

    shape = PRESETS[preset]
    counts = []
    for extra in settings:
        ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, **extra}}
        with deepspeed.zero.Init(config_dict_or_path=ds, dtype=torch.bfloat16):
            model = LlamaForCausalLM(shape.to_hf_config(max_position_embeddings=seq_len))
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for step in range(3):
            x = torch.randint(0, shape.vocab, (1, seq_len), generator=torch.Generator().manual_seed(step))
            loss = model(input_ids=x, labels=x).loss
            gathered = sum(p.ds_numel for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
            with _zero.backward_allowed(engine):
                loss.backward()
            _zero.after_backward(engine)
        counts.append(gathered)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("settings", nargs="+", help="zero_optimization overrides, one JSON object each")
    args = ap.parse_args()
    settings = [json.loads(s) for s in args.settings]

    import deepspeed  # noqa: F401  (imported once; the forked ranks inherit it)

    from lomo_trainer import _zero
    from lomo_trainer.llama_shapes import PRESETS
    from lomo_trainer.planner import ZeroKnobs, gathered_parameters
    from lomo_trainer.ranks import run_ranks

    _zero.disable_cpu_shm_build()
    counts = run_ranks(_probe, 2, args.preset, settings, args.seq_len, timeout=1800)[0]
    print("| zero_optimization | gathered after forward | planner |\n|---|---|---|")
    for extra, got in zip(settings, counts):
        predicted = gathered_parameters(PRESETS[args.preset], ZeroKnobs.from_ds_config(extra))
        print(f"| `{json.dumps(extra)}` | {got / 1e6:.1f} M | {predicted / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
