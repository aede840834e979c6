"""Process set-up shared by the commands: a plain process is a world of one, as in lomo-train."""
from __future__ import annotations

import os


def single_process_env() -> None:
    """Without a launcher, describe a world of one, or DeepSpeed falls back to MPI discovery (mpi4py)."""
    from ..cli import _single_process_env

    _single_process_env()


def setup_distributed(device_arg=None):
    """(device, rank) for a plain model: this rank's GPU when there is one; a process group when launched."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg) if device_arg else (
        torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, (dist.get_rank() if dist.is_initialized() else 0)
