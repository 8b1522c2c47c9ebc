"""History offload releases the device copy of what it offloads: nothing but autograd's saved graph may hold it.

Regression: the pack hook once kept a list of the banks it watched; autograd keeps the hook until backward, so
every offloaded bank stayed in device memory too (measured on the H200: memory after forward unchanged).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from spawned import free_port

from segtrain.parallel import offload as offload_module
from segtrain.parallel.context import context_parallel_segment_attention
from segtrain.parallel.offload import HistoryOffload


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD


def test_offloaded_bank_is_released_after_forward(group, monkeypatch):
    offloaded = []
    original = HistoryOffload._offload

    def spy(self, t):
        offloaded.append(t.untyped_storage())  # one reference of ours
        return original(self, t)

    monkeypatch.setattr(offload_module.HistoryOffload, "_offload", spy)
    S, T = 16, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    off = HistoryOffload()
    out = context_parallel_segment_attention(
        q * 1, k * 1, v * 1, segment_size=S, policy=["all", "sink:3+window:20"], ranges=[(0, T)], offload=off, backend="math"
    )
    gc.collect()
    assert offloaded and off.stats.offloaded > 0
    # only our reference is left: the device copy is free
    assert [torch._C._storage_Use_Count(s._cdata) for s in offloaded] == [1] * len(offloaded)

    ref = context_parallel_segment_attention(q, k, v, segment_size=S, policy=["all", "sink:3+window:20"], ranges=[(0, T)])
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert off.stats.prefetched + off.stats.waited >= off.stats.offloaded
