import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Import the heavy libraries once here, so forked ranks inherit them.
import deepspeed  # noqa: E402,F401
import transformers  # noqa: E402,F401

from lomo_trainer import _zero  # noqa: E402

_zero.disable_cpu_shm_build()


@pytest.fixture
def cpu_fp16(monkeypatch):
    """Let DeepSpeed build fp16 engines on a CPU without AVX512-FP16/AMX.

    DeepSpeed refuses fp16 where ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` is false, but torch computes
    fp16 on any x86-64 CPU (slowly). Only that gate is patched, so the fp16 logic (loss scaling, overflow
    skips under ZeRO-3) runs on every machine. Forked ranks inherit the patch."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
