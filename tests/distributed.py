"""Run a test body on W gloo processes on the CPU (the expert-parallel tests).

``run_on_ranks(world, body, *args)`` forks ``world`` processes, joins them in a gloo process group
(rendezvous through a file, so no port is needed) and calls ``body(rank, world, *args)`` in each;
an exception in any rank fails the test with that rank's traceback, and a rank that hangs (a
collective some rank never joined) fails it after ``timeout`` seconds instead of blocking CI.
Forked, not spawned: the children start with torch and the library already imported (a spawned
process re-imports them, seconds on a busy CPU); each child makes its own process group after
the fork. torch._dynamo, which DTensor imports on its first use (seconds), is imported here, before
the fork, so that the ranks do not each import it again.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch._dynamo  # noqa: F401 - see run_on_ranks
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world: int, store_path: str, body, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, body, *args, timeout: float = 120.0) -> None:
    """Run ``body(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first failure."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_child, args=(world, os.path.join(tmp, "store"), body, args), nprocs=world,
                                     join=False, start_method="fork")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"the {world} ranks did not finish within {timeout:.0f} s (a collective hangs)")
