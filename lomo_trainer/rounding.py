"""Stochastic rounding from fp32 to bf16.

bf16 keeps the top 16 bits of an fp32 number. Adding a uniform random integer in [0, 2^16) to the
fp32 bit pattern and then truncating the low 16 bits rounds away from zero with probability equal
to the discarded fraction, so E[round(x)] = x: updates smaller than one bf16 ulp survive on average
instead of being rounded away every time.
"""
from __future__ import annotations

import torch


def stochastic_round_to_bf16_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write ``src`` (fp32) into ``dst`` (bf16), rounding stochastically; non-finite values round to nearest."""
    assert src.dtype == torch.float32 and dst.dtype == torch.bfloat16 and src.shape == dst.shape
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # Masking with -65536 (0xFFFF0000 as int32) truncates the low half; the sign bit is untouched, so
    # the rounding acts on the magnitude and is unbiased for negative numbers too.
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(src), rounded, src)
    dst.copy_(rounded)  # exact: every value in ``rounded`` is representable in bf16
