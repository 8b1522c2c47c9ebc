"""Prefill cost of an execution mode: peak memory (CUDA) and time of segmented prefill through the engine.

Batch 1, the logits of the last token only, as a server would prefill a prompt: the KV cache holds
what the policy keeps (every key for ``all`` heads and in ``full`` mode; two segments for ``none``).
A first run warms up (kernel selection, allocator); the second is measured. Peak memory is
``torch.cuda.max_memory_allocated`` after a reset; "beyond" is the peak minus what was allocated
before (the weights). On CPU only the time is reported.
"""

from __future__ import annotations

import gc
import time

import torch

from segtrain.models.llama import LlamaForCausalLM

__all__ = ["prefill_cost"]

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_cost(model: LlamaForCausalLM, ids, *, warmup: bool = True) -> dict:
    """``{"time_s", "kv_cache_gib"}`` plus ``peak_gib``, ``beyond_gib`` on CUDA, for prefilling ``ids`` (one prompt)."""
    from segtrain.inference import SegmentedEngine

    device = next(model.parameters()).device
    engine = SegmentedEngine(model)
    ids = torch.as_tensor(ids, dtype=torch.long)
    result = {}
    for _ in range(2 if warmup else 1):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        _sync(device)
        t0 = time.perf_counter()
        cache = engine.new_cache(1, len(ids))
        logits = engine.prefill(cache, [ids])
        _sync(device)
        result = {"time_s": time.perf_counter() - t0, "kv_cache_gib": cache.memory_bytes() / GIB}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            result.update(peak_gib=peak / GIB, beyond_gib=(peak - before) / GIB)
        if not torch.isfinite(logits.float()).all():
            raise FloatingPointError("prefill gave non-finite logits")
        del cache, logits
    return result
