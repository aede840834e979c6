"""LOMOTrainer.wrap(...) on TRL's SFTTrainer and DPOTrainer (and Seq2SeqTrainer), against the stock class with torch
SGD (optim="sgd"), as test_conformance does for the plain Trainer: same seed, data and arguments.

SFT: prompt-completion rows of unequal length (padded, prompt tokens masked), on 1 process and on 2 ZeRO-3 ranks,
with and without global-norm clipping; SFT's own metrics (entropy, token accuracy, token count) are logged as the
stock class logs them, counted once per step although LOMO's clipping runs the forward twice.
DPO: the same, and the reference model (an inference-only ZeRO-3 engine on 2 ranks) holds no gradients and gives the
same log-probs after training as before.
"""
import pytest
import torch

from distributed import run_ranks
from models import tiny_llama, word_tokenizer
from trainers import ds_config

trl = pytest.importorskip("trl", reason="TRL is the optional extra [trl]")

WORDS = [f"w{i}" for i in range(60)]


def _text(g, lo, hi):
    n = int(torch.randint(lo, hi, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def sft_rows(n=32, seed=0):
    """Prompt-completion rows: 1-4 prompt words (masked from the loss), 2-10 completion words."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": _text(g, 1, 5), "completion": " " + _text(g, 2, 11)} for _ in range(n)])


def dpo_rows(n=32, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": _text(g, 1, 5), "chosen": " " + _text(g, 1, 7), "rejected": " " + _text(g, 1, 7)}
                              for _ in range(n)])


def _config(cls, out, lomo, zero3, clip, **kw):
    """A TRL config as a user writes it, in fp32 (TRL defaults to bf16) and with the stock SGD for the reference."""
    base = dict(output_dir=out, deepspeed=ds_config(clip) if zero3 else None, use_cpu=True, bf16=False,
                per_device_train_batch_size=2, max_steps=6, learning_rate=0.5, lr_scheduler_type="linear",
                warmup_steps=2, max_grad_norm=clip, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                disable_tqdm=True, max_length=32)
    base.update(kw)
    if not lomo:
        base["optim"] = "sgd"
    return cls(**base)


def _weights(trainer):
    from lomo_trainer import _zero

    if trainer.deepspeed is not None and _zero.is_engine(trainer.deepspeed):
        sd = _zero.consolidated_state_dict(trainer.deepspeed)
    else:
        sd = trainer.model.state_dict()
    return {k: v.double().clone() for k, v in (sd or {}).items()}  # ZeRO-3: gathered on rank 0 only


def _assert_same_weights(stock, ours, tol=2e-6):
    assert stock and set(stock) == set(ours)
    for name, expected in stock.items():
        err = (ours[name] - expected).abs().max().item()
        assert err <= tol * (1 + expected.abs().max().item()), f"{name}: off by {err:.2e}"


def _train_rows(history):
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def sft_run(rank, world, out, lomo, zero3=False, clip=0.0, **kw):
    from trl import SFTConfig, SFTTrainer

    from lomo_trainer import LOMOTrainer

    tokenizer, _ = word_tokenizer(WORDS)
    args = _config(SFTConfig, out, lomo, zero3, clip, **kw)
    cls = LOMOTrainer.wrap(SFTTrainer) if lomo else SFTTrainer
    trainer = cls(model=tiny_llama(), args=args, train_dataset=sft_rows(), processing_class=tokenizer)
    trainer.train()
    return dict(weights=_weights(trainer), history=trainer.state.log_history, step=trainer.state.global_step,
                cls=type(trainer).__name__)


@pytest.mark.multirank
@pytest.mark.parametrize("world,zero3,clip", [(1, False, 0.0), (1, False, 1.0), (2, True, 0.0), (2, True, 1.0)],
                         ids=["1-process", "1-process-clip", "2-ranks-zero3", "2-ranks-zero3-clip"])
def test_sft_same_weights_as_stock_sgd(tmp_path, world, zero3, clip):
    # clip 1.0 is below the first steps' gradient norms at lr 0.5: clipping changes the update
    stock = run_ranks(sft_run, world, str(tmp_path / "stock"), False, clip=clip)[0]
    ours = run_ranks(sft_run, world, str(tmp_path / "lomo"), True, zero3, clip=clip)[0]
    assert ours["cls"] == "LOMOSFTTrainer" and ours["step"] == stock["step"] == 6
    _assert_same_weights(stock["weights"], ours["weights"])
    # SFT's own metrics, once per step (LOMO's global clipping runs the forward twice)
    for s, o in zip(_train_rows(stock["history"]), _train_rows(ours["history"]), strict=True):
        assert o["num_tokens"] == s["num_tokens"], (o, s)
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert o[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), (key, o, s)
    if clip:
        grad = [h.get("grad_norm") for h in _train_rows(ours["history"])]
        stock_grad = [h["grad_norm"] for h in _train_rows(stock["history"])]
        assert grad == pytest.approx(stock_grad, rel=1e-4)
        assert max(stock_grad) > clip, "clipping must act"


def sft_card(rank, world, out):
    """A wrapped SFTTrainer that saves a checkpoint: TRL's _save_checkpoint writes TRL's model card first."""
    import os

    sft_run(rank, world, out, True, save_strategy="steps", save_steps=3, max_steps=3)
    with open(os.path.join(out, "README.md")) as f:
        return f.read()


@pytest.mark.multirank
def test_wrapped_trl_model_card_names_lomo(tmp_path):
    card = run_ranks(sft_card, 1, str(tmp_path / "out"))[0]
    assert "SFT" in card and "- lomo" in card, card  # TRL's card, with LOMO in its tags
    assert "- optimizer: LOMO (fused into backward, lomo_trainer)" in card, card


def dpo_run(rank, world, out, lomo, zero3=False, clip=0.0, **kw):
    from trl import DPOConfig, DPOTrainer

    from lomo_trainer import LOMOTrainer

    tokenizer, _ = word_tokenizer(WORDS)
    # lr 0.1: at SFT's 0.5 the DPO loss swings enough to amplify float rounding (the order of the ranks' sums) x3 a step
    kw.setdefault("learning_rate", 0.1)
    args = _config(DPOConfig, out, lomo, zero3, clip, beta=0.5, gradient_checkpointing=False, **kw)
    cls = LOMOTrainer.wrap(DPOTrainer) if lomo else DPOTrainer
    trainer = cls(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=dpo_rows(),
                  processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ref_before = [t.clone() for t in trainer.compute_ref_log_probs(trainer.ref_model, batch)]
    trainer.train()
    ref_after = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    policy_after = trainer.compute_ref_log_probs(trainer.model, batch)  # the trained model, through the same path
    ref = trainer.ref_model
    ref_params = list(ref.parameters())
    return dict(weights=_weights(trainer), history=trainer.state.log_history, step=trainer.state.global_step,
                ref_same=all(torch.equal(a, b) for a, b in zip(ref_before, ref_after)),
                policy_moved=not all(torch.allclose(a, b) for a, b in zip(ref_before, policy_after)),
                ref_grads=sum(p.grad is not None for p in ref_params),
                ref_trainable=sum(p.requires_grad for p in ref_params),
                ref_engine=type(ref).__name__)


@pytest.mark.multirank
@pytest.mark.parametrize("world,zero3,clip", [(1, False, 0.0), (2, True, 0.0), (2, True, 1.0)],
                         ids=["1-process", "2-ranks-zero3", "2-ranks-zero3-clip"])
def test_dpo_same_weights_as_stock_sgd_and_reference_unchanged(tmp_path, world, zero3, clip):
    stock = run_ranks(dpo_run, world, str(tmp_path / "stock"), False, clip=clip)[0]
    ours = run_ranks(dpo_run, world, str(tmp_path / "lomo"), True, zero3, clip=clip)[0]
    assert ours["step"] == stock["step"] == 6
    _assert_same_weights(stock["weights"], ours["weights"])
    assert ours["ref_same"] and ours["policy_moved"], ours
    assert ours["ref_grads"] == 0 and ours["ref_trainable"] == 0
    if zero3:
        assert ours["ref_engine"] == "DeepSpeedEngine"  # DPOTrainer's inference-only partitioned reference
    for s, o in zip(_train_rows(stock["history"]), _train_rows(ours["history"]), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
            assert o[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (key, o, s)


def seq2seq_run(rank, world, out, lomo):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

    from lomo_trainer import LOMOTrainer

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 64, (8,), generator=g).tolist(),
             "labels": torch.randint(1, 64, (5,), generator=g).tolist()} for _ in range(16)]
    args = Seq2SeqTrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=2, max_steps=4,
                                    learning_rate=0.1, max_grad_norm=0.0, report_to=[], save_strategy="no", seed=0,
                                    disable_tqdm=True, predict_with_generate=True, generation_max_length=6,
                                    **({} if lomo else {"optim": "sgd"}))
    cls = LOMOTrainer.wrap(Seq2SeqTrainer) if lomo else Seq2SeqTrainer
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]))
    trainer.train()
    predictions = trainer.predict(Dataset.from_list(rows[:4])).predictions  # Seq2SeqTrainer's generate path
    return dict(weights=_weights(trainer), predictions=torch.as_tensor(predictions))


@pytest.mark.multirank
def test_seq2seq_trainer_wrapped(tmp_path):
    stock = run_ranks(seq2seq_run, 1, str(tmp_path / "stock"), False)[0]
    ours = run_ranks(seq2seq_run, 1, str(tmp_path / "lomo"), True)[0]
    _assert_same_weights(stock["weights"], ours["weights"])
    assert torch.equal(stock["predictions"], ours["predictions"])


def test_wrap_is_one_class_per_trainer_and_keeps_its_overrides():
    from transformers import Trainer
    from trl import DPOTrainer, SFTTrainer

    from lomo_trainer import LOMOTrainer
    from lomo_trainer.errors import ConfigError

    wrapped = LOMOTrainer.wrap(SFTTrainer)
    assert wrapped is LOMOTrainer.wrap(SFTTrainer) and wrapped.__name__ == "LOMOSFTTrainer"
    assert issubclass(wrapped, SFTTrainer) and issubclass(wrapped, LOMOTrainer)
    mro = wrapped.__mro__
    # the wrapped class's overrides come first and reach LOMOTrainer's through super(); LOMO's stand before Trainer
    assert mro.index(SFTTrainer) < mro.index(LOMOTrainer) < mro.index(Trainer)
    assert wrapped.compute_loss is SFTTrainer.compute_loss and wrapped.create_scheduler is LOMOTrainer.create_scheduler
    assert LOMOTrainer.wrap(DPOTrainer).__name__ == "LOMODPOTrainer"
    assert LOMOTrainer.wrap(wrapped) is wrapped
    with pytest.raises(ConfigError, match="Trainer subclass"):
        LOMOTrainer.wrap(dict)
