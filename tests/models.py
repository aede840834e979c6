"""Small models and batches for the optimizer tests, the float64 SGD reference on them, a word-level tokenizer."""
from __future__ import annotations

import reference
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

VOCAB = 1600  # 1600 x 64 = 102400 elements: the embedding is above DeepSpeed's default persistence threshold
# The engine config of the optimizer tests: ZeRO-3 with DeepSpeed's defaults (persistence threshold included)
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}


def allow_cpu_fp16() -> None:
    """Let ``deepspeed.initialize`` accept fp16 on any CPU. Call it in the forked rank, before initialize.

    DeepSpeed's engine refuses fp16 unless ``get_accelerator().is_fp16_supported()`` (on CPU: oneDNN's
    AVX512-FP16/AMX check); torch itself computes fp16 on any x86-64 CPU, so only the gate is patched,
    on DeepSpeed's accelerator singleton, and the fp16 logic under test runs unchanged."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def fp16_mlp():
    """A small fp16 MLP for the loss-scaling tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).half()


def tiny_llama(tie: bool = True, seed: int = 0, vocab: int = VOCAB, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def word_tokenizer(words):
    """(tokenizer, vocab): one id per whitespace-separated word in ``words``, <unk> for any other; BOS first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>"), vocab


class OddLM(nn.Module):
    """A language model with awkward parameter sizes: a 5-element and a 1-element parameter (padding that
    covers whole shards on 4 ranks), tied input/output embeddings and checkpointed blocks."""

    def __init__(self, vocab: int = 97, dim: int = 24, checkpointing: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 3 * dim + 1), nn.Tanh(), nn.Linear(3 * dim + 1, dim))
                                    for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as HF ties them: the same Parameter in two modules
        self.gate = nn.Parameter(torch.randn(5) * 0.1)
        self.temp = nn.Parameter(torch.ones(1))
        self.checkpointing = checkpointing

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids)
        for block in self.blocks:
            h = h + (checkpoint(block, h, use_reentrant=False) if self.checkpointing else block(h))
        h = self.norm(h) * (1 + self.gate.sum()) * self.temp
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def batch(step: int, rank: int, vocab: int, bsz: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (bsz, seq), generator=g)


def reference_sgd(model: nn.Module, steps: int, world: int, vocab: int, lr: float, weight_decay: float = 0.0,
                  clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                  per_param: bool = False, batches=None) -> dict[str, torch.Tensor]:
    """float64 SGD on the rank-averaged loss (tests/reference.py). ``batches[step][rank]`` overrides the generated
    batches (e.g. the ones a trainer actually drew)."""
    get = (lambda s, r: batches[s][r]) if batches is not None else (lambda s, r: batch(s, r, vocab))
    return reference.train(model, steps, reference.rank_mean_loss(world, get), reference.sgd(lr, weight_decay),
                           max_norm=clip_grad_norm, per_param=per_param, max_value=clip_grad_value)


def reference_adalomo(model, steps, world, vocab, lr, weight_decay=0.0, clip_threshold=1.0, decay_rate=-0.8,
                      eps=(1e-30, 1e-3), clip_grad_norm=None, clip_grad_value=None, per_param=False, batches=None,
                      keep=lambda name: True):
    """float64 AdaLomo (tests/reference.py) on the rank-averaged loss, over the parameters ``keep`` names (the
    others stay fixed)."""
    get = (lambda s, r: batches[s][r]) if batches is not None else (lambda s, r: batch(s, r, vocab))
    rule = reference.adalomo(lr, weight_decay, clip_threshold, decay_rate, eps)
    return reference.train(model, steps, reference.rank_mean_loss(world, get), rule, keep=keep,
                           max_norm=clip_grad_norm, per_param=per_param, max_value=clip_grad_value)
