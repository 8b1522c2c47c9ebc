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


def cp_oracle_worker(rank, world, port, cases, backend, out_dir):
    """Per oracle case ``[out, dq, dk, dv]`` of this rank's shard, context parallelism over gloo. A case with
    ``positions`` runs in document mode. ``backend``: None for the operator's default; ``"flex"`` takes the one-call
    flex form on CPU, forward only (``[out]``), and checks that it ran for every case."""
    import datetime
    import os

    import oracle
    import torch.distributed as dist

    from segtrain.attention import Documents
    from segtrain.parallel import context, context_parallel_segment_attention

    flex = backend == "flex"
    calls = force_flex_form(context) if flex else []
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        results = []
        for i, c in enumerate(cases):
            lo, hi = c["ranges"][rank]
            q, k, v, w = oracle.make_qkv(c, seed=i)
            q, k, v = (t[:, :, lo:hi].detach().clone().requires_grad_(not flex) for t in (q, k, v))
            options = {} if backend is None else {"backend": backend}
            if "positions" in c:
                options["documents"] = Documents.from_position_ids(torch.tensor(c["positions"])[:, lo:hi])
            out = context_parallel_segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], ranges=c["ranges"],
                                                     **options)  # fmt: skip
            if not flex:
                (out * w[:, :, lo:hi]).sum().backward()
            results.append([out.detach(), *([] if flex else [q.grad, k.grad, v.grad])])
        assert len(calls) == (len(cases) if flex else 0), f"the flex form ran {len(calls)} times for {len(cases)} cases"
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
