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
def _history_index(policies: tuple[HeadPolicy, ...], end: int):
    """Per-head history positions for history ending at ``end``, as ``slice`` or padded ``(index, valid)``."""
    ranges = [p.history_ranges(end) for p in policies]
    if all(r == ranges[0] for r in ranges) and len(ranges[0]) <= 1:
        return slice(*ranges[0][0]) if ranges[0] else None
    pos = [[j for lo, hi in r for j in range(lo, hi)] for r in ranges]
    width = max(map(len, pos))
    if width == 0:
        return None
    index = torch.tensor([p + [0] * (width - len(p)) for p in pos])
    valid = torch.tensor([[True] * len(p) + [False] * (width - len(p)) for p in pos])
    return index, valid


def segmented_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies: Sequence[HeadPolicy], scale: float
) -> Tensor:
    T, S, Hkv = q.shape[2], segment_size, k.shape[1]
    policies = tuple(policies)
    heads = torch.arange(Hkv, device=q.device)[:, None]
    outs = []
    for s in range(math.ceil(T / S)):
        a, b = s * S, min(T, (s + 1) * S)
        end = history_end(s, S)
        kh = vh = valid = None
        hist = _history_index(policies, end)
        if isinstance(hist, slice):
            kh, vh = k[:, :, hist], v[:, :, hist]
        elif hist is not None:
            index, valid = (t.to(q.device) for t in hist)
            kh, vh = k[:, heads, index], v[:, heads, index]  # [B, Hkv, Lh, D]
        out, _ = segment_block_attention(
            q[:, :, a:b],
            k[:, :, end:b],
            v[:, :, end:b],
            kh,
            vh,
            q_positions=range(a, b),
            local_positions=range(end, b),
            history_valid=valid,
            scale=scale,
        )
        outs.append(out)
    return torch.cat(outs, dim=2)
