"""Attention of one segment's queries over its KV pieces: the building block of everything else.

A query block lies inside one segment ``s``. Its keys come in two pieces:

- *local*: the previous segment and the current one (keys at positions ``>= history_end(s)``).
  A local key is visible iff its position is ``<=`` the query's position; gradient flows into it.
- *history*: keys before the previous segment, already selected by the head's policy (the caller
  gathers them: a slice of the sequence in training, the per-head cache in inference, the keys a
  previous context-parallel rank sent). History is detached here, whatever the caller passes:
  gradient reaches Q through it, never K/V.

Both pieces feed ONE softmax (the union of visible keys), so no merge is needed; the returned
log-sum-exp lets a caller that splits keys further merge exactly with :func:`merge_partials`.
Positions are explicit so that batches of sequences at different offsets (decoding) and padded
slots (position ``-1``) need no special path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["segment_block_attention", "merge_partials"]


def _safe_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-sum-exp; a row with no visible key gives 0 and -inf, never NaN."""
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # cancels exactly
    e = torch.exp(scores - m)
    den = e.sum(-1, keepdim=True)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    lse = torch.where(den > 0, m + torch.log(safe_den), torch.full_like(den, -math.inf))
    return e / safe_den, lse.squeeze(-1)


def merge_partials(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two attentions over disjoint key sets (``out [..., T, D]``, ``lse [..., T]``).

    Safe when either or both parts are empty (lse ``-inf``): the textbook ``logaddexp`` form gives
    NaN there, in the output and in the gradient.
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e1, e2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    den = e1 + e2
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    out = (out1 * (e1 / safe_den).unsqueeze(-1).to(out1.dtype)) + (out2 * (e2 / safe_den).unsqueeze(-1).to(out2.dtype))
    lse = torch.where(den > 0, m + torch.log(safe_den), torch.full_like(den, -math.inf))
    return out, lse


def _positions(pos: Tensor | range, batch: int, device) -> Tensor:
    pos = torch.as_tensor(pos, device=device) if not isinstance(pos, range) else torch.arange(pos.start, pos.stop, device=device)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[0] not in (1, batch):
        raise ValueError(f"positions must be [T] or [B, T] with B={batch}, got shape {tuple(pos.shape)}")
    return pos


def segment_block_attention(
    q: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    k_history: Tensor | None = None,
    v_history: Tensor | None = None,
    *,
    q_positions: Tensor | range,
    local_positions: Tensor | range,
    history_valid: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One query block of one segment against its local and history KV; returns ``(out, lse)``.

    Args:
        q: ``[B, Hq, Tq, D]``, queries at ``q_positions`` (``[Tq]`` or ``[B, Tq]``), all in one segment.
        k_local, v_local: ``[B, Hkv, Lk, D]`` at ``local_positions`` (``[Lk]`` or ``[B, Lk]``, ``-1``
            marks an empty slot): previous and current segment; causal by position, with gradient.
        k_history, v_history: ``[B, Hkv, Lh, D]`` or None: the history the policy reads for this
            segment, every valid entry visible to every query; detached here.
        history_valid: ``[Hkv, Lh]`` or ``[B, Hkv, Lh]`` bool, False for padding (heads read
            different amounts of history); None means all valid.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``out [B, Hq, Tq, Dv]`` in q's dtype and ``lse [B, Hq, Tq]`` (natural log, float32 or
        float64), ``-inf`` on a row that sees no key.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Lk = k_local.shape[1], k_local.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_pos = _positions(q_positions, B, q.device)
    k_pos = _positions(local_positions, B, q.device)

    neg_inf = torch.tensor(-math.inf, dtype=acc, device=q.device)
    # [B, Hkv, G*Tq, D]: query heads grouped under their KV head, so K/V are never repeated.
    qg = q.reshape(B, Hkv, G * Tq, D)
    s_local = torch.matmul(qg, k_local.transpose(-1, -2)).to(acc).view(B, Hkv, G, Tq, Lk) * scale
    local_ok = (k_pos >= 0)[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B|1, Tq, Lk]
    scores = torch.where(local_ok[:, None, None], s_local, neg_inf)
    has_history = k_history is not None and k_history.shape[2] > 0
    if has_history:
        k_history, v_history = k_history.detach(), v_history.detach()
        Lh = k_history.shape[2]
        s_hist = torch.matmul(qg, k_history.transpose(-1, -2)).to(acc).view(B, Hkv, G, Tq, Lh) * scale
        if history_valid is not None:
            valid = history_valid if history_valid.dim() == 3 else history_valid.unsqueeze(0)
            s_hist = torch.where(valid[:, :, None, None, :], s_hist, neg_inf)
        scores = torch.cat([scores, s_hist], -1)
    p, lse = _safe_softmax(scores)
    p = p.to(v_local.dtype).reshape(B, Hkv, G * Tq, -1)
    out = torch.matmul(p[..., :Lk], v_local)
    if has_history:
        out = out + torch.matmul(p[..., Lk:], v_history)
    return out.reshape(B, Hq, Tq, -1), lse.reshape(B, Hq, Tq)
