"""The ``math`` backend: pure PyTorch, segment by segment, differentiable on any device.

Memory grows with the keys one segment sees, not with ``T x T``. This is the CPU training path
(torch's FlexAttention has no backward on CPU) and the fallback anywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from segtrain.attention.block import segment_block_attention
from segtrain.policy import HeadPolicy, history_end


@lru_cache(maxsize=4096)
def head_runs(policies: tuple[HeadPolicy, ...], end: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Runs ``(h0, h1, ranges)`` of adjacent KV heads that read the same history ranges when history ends at ``end``.

    Each run attends over slices of K/V (views, no gather, no padding across heads). With the usual
    tables (the first k heads ``all``, the rest ``none``) that is two runs per segment.
    """
    runs: list[tuple[int, int, list[tuple[int, int]]]] = []
    for h, p in enumerate(policies):
        ranges = p.history_ranges(end)
        if runs and runs[-1][2] == ranges:
            runs[-1] = (runs[-1][0], h + 1, ranges)
        else:
            runs.append((h, h + 1, ranges))
    return runs


def segmented_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies: Sequence[HeadPolicy], scale: float
) -> Tensor:
    T, S = q.shape[2], segment_size
    G = q.shape[1] // k.shape[1]
    policies = tuple(policies)
    outs = []
    for s in range(math.ceil(T / S)):
        a, b = s * S, min(T, (s + 1) * S)
        end = history_end(s, S)
        parts = []
        for h0, h1, ranges in head_runs(policies, end):
            kh = vh = None
            if ranges:
                kh = (
                    torch.cat([k[:, h0:h1, lo:hi] for lo, hi in ranges], 2) if len(ranges) > 1 else k[:, h0:h1, slice(*ranges[0])]
                )
                vh = (
                    torch.cat([v[:, h0:h1, lo:hi] for lo, hi in ranges], 2) if len(ranges) > 1 else v[:, h0:h1, slice(*ranges[0])]
                )
            out, _ = segment_block_attention(
                q[:, h0 * G : h1 * G, a:b],
                k[:, h0:h1, end:b],
                v[:, h0:h1, end:b],
                kh,
                vh,
                q_positions=range(a, b),
                local_positions=range(end, b),
                scale=scale,
            )
            parts.append(out)
        outs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(outs, dim=2)
