"""Spawned test workers with a deadline: ``worker(rank, world, port, *args, out_dir)`` saves ``out_dir/<rank>.pt``."""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(worker, world: int, args: tuple, tmp_path, timeout: float) -> list:
    """Run ``world`` workers; a deadlock fails the test after ``timeout`` seconds instead of hanging CI."""
    ctx = mp.spawn(worker, args=(world, free_port(), *args, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers did not finish in {timeout}s (deadlock?)")
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world)]
