"""The ``math`` backend: pure PyTorch, segment by segment, differentiable on any device.

Memory grows with the keys one segment sees, not with ``T x T``. This is the CPU training path
(torch's FlexAttention has no backward on CPU) and the fallback anywhere else. With
``carry_grad=False`` the previous segment joins the detached history keys (every key of it is
visible to every query of the segment either way), so no gradient crosses a segment boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


def sequence_history(k: Tensor, v: Tensor) -> Callable[[int, int, list[tuple[int, int]]], tuple[Tensor, Tensor]]:
    """The ``history`` of :func:`segment_loop` when the whole sequence's K/V is at hand: slices of it."""

    def history(h0: int, h1: int, ranges: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        if len(ranges) == 1:
            return k[:, h0:h1, slice(*ranges[0])], v[:, h0:h1, slice(*ranges[0])]
        return torch.cat([k[:, h0:h1, lo:hi] for lo, hi in ranges], 2), torch.cat([v[:, h0:h1, lo:hi] for lo, hi in ranges], 2)

    return history


def segmented_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies: Sequence[HeadPolicy], scale: float, carry_grad: bool = True
) -> Tensor:
    return segment_loop(q, k, v, segment_size, policies, scale, sequence_history(k, v), carry_grad=carry_grad)


def segment_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    policies: Sequence[HeadPolicy],
    scale: float,
    history: Callable[[int, int, list[tuple[int, int]]], tuple[Tensor, Tensor]],
    *,
    q_start: int = 0,
    kv_start: int = 0,
    carry_grad: bool = True,
    block: Callable[..., tuple[Tensor, Tensor | None]] = segment_block_attention,
) -> Tensor:
    """Segment by segment, per run of heads: queries at positions ``[q_start, q_start + Tq)`` over the live K/V
    (``k``, ``v`` hold positions from ``kv_start``: each query's previous and own segment) and the history
    keys ``history(h0, h1, ranges)`` gives for KV heads ``[h0, h1)``. Single device and context parallel
    (:mod:`segtrain.parallel.context`, history from its bank) share this loop. ``carry_grad=False``: the
    previous segment is read as detached history. ``block`` runs one segment and run of heads
    (:func:`~segtrain.attention.block.segment_block_attention`'s arguments; the ``te`` backend passes its kernel).
    """
    hi, S = q_start + q.shape[2], segment_size
    G = q.shape[1] // k.shape[1]
    policies = tuple(policies)
    outs = []
    for s in range(q_start // S, math.ceil(hi / S)):
        own, b = s * S, min(hi, (s + 1) * S)
        a = max(q_start, own)  # q_start may fall inside a segment (a document continued under CP)
        end = history_end(s, S)
        live = end if carry_grad else own  # first live key: the previous segment's, or the own segment's
        parts = []
        for h0, h1, ranges in head_runs(policies, end):
            kh, vh = history(h0, h1, ranges) if ranges else (None, None)
            if live > end:  # the previous segment, detached like history
                kp, vp = k[:, h0:h1, end - kv_start : own - kv_start], v[:, h0:h1, end - kv_start : own - kv_start]
                kh, vh = (kp, vp) if kh is None else (torch.cat([kh, kp], 2), torch.cat([vh, vp], 2))
            out, _ = block(
                q[:, h0 * G : h1 * G, a - q_start : b - q_start],
                k[:, h0:h1, live - kv_start : b - kv_start],
                v[:, h0:h1, live - kv_start : b - kv_start],
                kh,
                vh,
                q_positions=range(a, b),
                local_positions=range(live, b),
                scale=scale,
            )
            parts.append(out)
        outs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(outs, dim=2)
