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



@pytest.fixture(autouse=True)
def _multirank_mark_is_honest(request):
    """``run_ranks`` refuses to fork ranks in a test not marked ``multirank`` (distributed.py)."""
    import distributed

    distributed.marked_multirank = request.node.get_closest_marker("multirank") is not None
    yield
    distributed.marked_multirank = True
