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


def force_flex_form(context) -> list:
    """In a worker: make ``backend="flex"`` take context parallelism's one-call FlexAttention form on CPU (CUDA-only
    otherwise; eager CPU FlexAttention runs forward only). Returns a list that grows by one per call of that form,
    so a test can prove it ran. ``context``: the module :mod:`segtrain.parallel.context`."""
    calls, run = [], context.flex_cp_attention
    context.context_parallel_form = lambda backend, q, segment_size: "flex" if backend == "flex" else "math"
    context.flex_cp_attention = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)
    return calls
