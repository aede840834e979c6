"""An HF-style causal-LM fine-tuning script, shaped as transformers' examples/pytorch/language-modeling/run_clm.py:
HfArgumentParser, get_last_checkpoint, train (with resume), save_model, log_metrics/save_metrics/save_state,
evaluate with compute_metrics and preprocess_logits_for_metrics, create_model_card. The Trainer class is the only
thing the contract test changes (``main(argv, trainer_cls)``)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import (HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments,
                          default_data_collator)
from transformers.trainer_utils import get_last_checkpoint


@dataclass
class ModelArguments:
    vocab_size: int = field(default=1600)
    block_size: int = field(default=16)
    seed_model: int = field(default=0)


def build_datasets(vocab: int, block: int):
    """Fixed blocks of "text": grouped into equal-length blocks, labels = input_ids, as run_clm's group_texts."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, vocab, (48 * block,), generator=g).view(-1, block)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * block, "labels": r.tolist()} for r in stream]
    return Dataset.from_list(rows[:40]), Dataset.from_list(rows[40:])


def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds):
    preds, labels = eval_preds
    preds, labels = torch.as_tensor(preds)[:, :-1].reshape(-1), torch.as_tensor(labels)[:, 1:].reshape(-1)
    return {"accuracy": (preds == labels).float().mean().item()}


def main(argv: list[str], trainer_cls=Trainer) -> dict:
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    torch.manual_seed(model_args.seed_model)
    config = LlamaConfig(vocab_size=model_args.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    train_dataset, eval_dataset = build_datasets(model_args.vocab_size, model_args.block_size)
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=default_data_collator, compute_metrics=compute_metrics,
                          preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    results = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 50 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
    trainer.create_model_card(finetuned_from="scratch", tasks="text-generation")
    return results
