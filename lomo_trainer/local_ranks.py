"""Run a function on N local ranks, and set up a plain process as a world of one.

Forked for CPU/gloo (each rank inherits the parent's imports, so a rank
costs a second instead of the ~10 s import of torch + deepspeed + transformers), spawned for CUDA/NCCL (no
rank may inherit a CUDA context). The parent never initialises torch.distributed. Used by the benchmark and
the multi-rank tests."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> bool:
    """Started without a launcher (a plain ``python train.py``): describe a world of one in the environment, or
    DeepSpeed falls back to MPI discovery (and dies without mpi4py). Returns whether it set anything."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return False
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    return True


def _child(fn, rank, world, local_world, backend, port, queue, args, kwargs):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank % local_world), LOCAL_WORLD_SIZE=str(local_world),
                          GROUP_RANK=str(rank // local_world))
        import torch
        import torch.distributed as dist

        if backend == "nccl":
            device = torch.device("cuda", rank % local_world)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args, **kwargs)
        finally:
            if dist.is_initialized():  # fn may have ended it itself
                dist.destroy_process_group()
        queue.put((rank, True, pickle.dumps(result)))  # by value: the child exits before the parent reads
    except BaseException:  # report everything, assertion failures included, to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, backend: str = "gloo", local_world: int | None = None,
              timeout: float = 240, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` local ranks and return the results by rank.
    ``local_world`` ranks per simulated node (LOCAL_RANK = rank % local_world; default: one node). A failure
    on any rank raises with that rank's traceback."""
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, local_world or world, backend, port, queue, args, kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now hang in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
