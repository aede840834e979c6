"""Process set-up shared by the commands: a plain process is a world of one, as in lomo-train."""
from __future__ import annotations


def single_process_env() -> None:
    """Without a launcher, describe a world of one, or DeepSpeed falls back to MPI discovery (mpi4py)."""
    from ..cli import _single_process_env

    _single_process_env()
