"""Run a function on several gloo processes on this CPU, with a free port and a hard timeout, so a hung
collective fails the test instead of hanging CI. Workers write their results with torch.save into `out`."""

import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, out, *args)
    except BaseException:  # the parent reports it; the traceback is the useful part
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run(fn, world, out, *args, timeout=240):
    """Run fn(rank, world, out, *args) on `world` processes; raise with the workers' tracebacks on failure."""
    context = mp.start_processes(_entry, args=(fn, world, free_port(), str(out), args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} workers did not finish within {timeout} s")
    except Exception as error:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.startswith("error")]
        raise AssertionError("\n".join(errors) or str(error)) from error
