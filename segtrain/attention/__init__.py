"""``segment_attention``: the one attention operator of segtrain (DESIGN.md §1).

For a query at position ``t`` in segment ``s = t // S`` and each KV head, the visible keys are its
own segment up to ``t`` and the whole previous segment (gradient flows into their K/V), plus the
history (segments ``< s - 1``) that the head's policy reads, detached: gradient reaches Q through
history, never K/V. One softmax runs over all visible keys.

Backends and their rules live in the registry, :mod:`segtrain.attention.backends`. Each decoder
layer calls attention through one slot (:mod:`segtrain.attention.slot`) that context parallelism and
the inference engine fill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from segtrain.attention.backends import BACKEND_NAMES, BACKENDS, resolve_backend, run_documents
from segtrain.attention.block import merge_partials, segment_block_attention
from segtrain.attention.documents import Documents
from segtrain.attention.slot import SegmentAttention, attention_slots, fill_slots, filled_slots, restore_slots
from segtrain.policy import HeadPolicy, as_head_policies

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "Documents",
    "SegmentAttention",
    "attention_slots",
    "check_qkv",
    "fill_slots",
    "filled_slots",
    "merge_partials",
    "resolve_backend",
    "restore_slots",
    "segment_attention",
    "segment_block_attention",
]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, segment_size: int) -> None:
    """Shapes, dtypes, devices and segment size of a segment-attention call; errors name the bad input."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    (B, Hq, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (Bk, Hkv, Tk) != tuple(v.shape[:3]):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if Bk != B or Tk != T:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and length")
    if Dk != D:
        raise ValueError(f"q and k head dims differ: {D} vs {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads and k has {Hkv}: query heads must be a multiple of KV heads")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}"
        )
    if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
        raise ValueError(f"segment_size must be an integer >= 1, got {segment_size!r}")


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_size: int,
    policy: str | HeadPolicy | Sequence[str | HeadPolicy],
    backend: str = "auto",
    scale: float | None = None,
    carry_grad: bool = True,
    documents: Documents | None = None,
) -> Tensor:
    """Segment attention over a whole sequence (the parallel form).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, T, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
        segment_size: tokens per segment ``S``; the last segment may be partial.
        policy: one history policy per KV head (strings like ``"sink:4+window:1024"`` or
            ``HeadPolicy``), or one for all heads.
        backend: a name of :data:`BACKEND_NAMES` (``auto``: the fastest that runs here).
        scale: softmax scale, default ``1/sqrt(D)``.
        carry_grad: gradient flows into the previous segment's K/V (the carried KV). False reads it
            detached, like history (the Transformer-XL stop-gradient, an ablation).
        documents: document mode (DESIGN.md §1 "Documents"): the packed documents of each row
            (:meth:`Documents.from_position_ids`); each is attended as if alone. None: one stream.

    Returns:
        ``[B, Hq, T, D]`` in q's dtype.
    """
    check_qkv(q, k, v, segment_size)
    policies = as_head_policies(policy, k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve_backend(backend, q)
    if documents is not None:
        if documents.length != q.shape[2]:
            raise ValueError(f"documents cover {documents.length} tokens, q has {q.shape[2]}")
        if documents.continued:
            raise ValueError(
                f"position_ids: a row starts at position {int(documents.positions[:, 0].max())}, inside a document; in "
                "document mode each row starts a document at 0 (only a context-parallel shard continues one)"
            )
        if not documents.is_one_stream():
            return run_documents(name, q, k, v, segment_size, policies, scale, carry_grad, documents)
    return BACKENDS[name].run(q, k, v, segment_size, policies, scale, carry_grad)
