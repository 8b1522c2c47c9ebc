"""The materialised ``T x T`` oracle: obviously correct, for tests and small shapes only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from segtrain.policy import HeadPolicy, history_end


def visibility_masks(seq_len: int, segment_size: int, policies: Sequence[HeadPolicy], device=None):
    """``(live [T, T], history [H, T, T])`` bool masks, built segment by segment from the policy's ranges."""
    T, S = seq_len, segment_size
    live = torch.zeros(T, T, dtype=torch.bool, device=device)
    hist = torch.zeros(len(policies), T, T, dtype=torch.bool, device=device)
    for s in range(math.ceil(T / S)):
        a, b = s * S, min(T, (s + 1) * S)
        end = history_end(s, S)
        live[a:b, end:b] = torch.ones(b - a, b - end, dtype=torch.bool, device=device).tril(diagonal=a - end)
        for h, p in enumerate(policies):
            for lo, hi in p.history_ranges(end):
                hist[h, a:b, lo:hi] = True
    return live, hist


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies: Sequence[HeadPolicy], scale: float, carry_grad: bool = True
) -> Tensor:
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    live, hist = visibility_masks(T, segment_size, policies, q.device)
    if not carry_grad:  # the previous segment is read detached, like history
        segment = torch.arange(T, device=q.device) // segment_size
        previous = live & (segment[:, None] != segment[None, :])
        live, hist = live & ~previous, hist | previous
    hist = hist.repeat_interleave(G, dim=0)  # query head h reads KV head h // G
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_live = (q @ k.transpose(-1, -2)).to(acc) * scale
    s_hist = (q @ k.detach().transpose(-1, -2)).to(acc) * scale
    logits = torch.where(live, s_live, torch.where(hist, s_hist, torch.tensor(-math.inf, dtype=acc, device=q.device)))
    p = torch.softmax(logits, dim=-1).to(v.dtype)  # the diagonal is always visible: no empty row
    return (p * live) @ v + (p * hist) @ v.detach()
