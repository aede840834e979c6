"""Rank and world under torch.distributed (one process: 0 and 1), errors every rank raises together, the group's end."""
from __future__ import annotations

import torch.distributed as dist

from .errors import CheckpointError, ConfigError, SaveFailed, TrainingDiverged

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def initialized() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave(created_here: bool) -> None:
    """The end of a command that succeeded on every rank: if the command created the process group (it was not
    initialised when the command started), wait for every rank and destroy it. A process that exits with the group
    alive can abort in the backend's thread teardown ("terminate called without an active exception", SIGABRT)
    after its work is done, and the launcher then reports the run as failed."""
    if created_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_AGREED_ERRORS = {cls.__name__: cls for cls in (CheckpointError, ConfigError, SaveFailed, TrainingDiverged)}


def raise_agreed(error: BaseException | None) -> None:
    """Collective, and a barrier: every rank calls it at the same point with the error it met there, or None. If any
    rank met one, every rank raises the first such rank's error (its class and its one line), so no rank is left
    waiting in a collective while another exits."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    first = next((f for f in found if f is not None), None)
    if first is None:
        return
    if error is not None and mine == first:
        raise error
    raise _AGREED_ERRORS.get(first[0], RuntimeError)(first[1])
