"""``segment_attention``: the one attention operator of segtrain (DESIGN.md §1).

For a query at position ``t`` in segment ``s = t // S`` and each KV head, the visible keys are its
own segment up to ``t`` and the whole previous segment (gradient flows into their K/V), plus the
history (segments ``< s - 1``) that the head's policy reads, detached: gradient reaches Q through
history, never K/V. One softmax runs over all visible keys.

Backends (names are API): ``reference`` (materialised ``T x T``: the test oracle), ``math`` (pure
PyTorch, segment by segment: any device, the CPU training path), ``flex`` (torch FlexAttention,
block-sparse Triton kernels on the GPU; forward only on CPU), ``flash`` (the same mask run by
flash-attn-4's kernels through FlexAttention; needs ``flash_attn.cute``), ``auto`` (the fastest
available).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from segtrain.attention.block import merge_partials, segment_block_attention
from segtrain.attention.flex import flash_available, flash_segment_attention, flex_available, flex_segment_attention
from segtrain.attention.reference import reference_attention
from segtrain.attention.segmented import segmented_attention
from segtrain.policy import HeadPolicy, as_head_policies

__all__ = ["BACKENDS", "check_qkv", "segment_attention", "segment_block_attention", "merge_partials", "resolve_backend"]

BACKENDS = {
    "reference": reference_attention,
    "math": segmented_attention,
    "flex": flex_segment_attention,
    "flash": flash_segment_attention,
}
_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(backend: str, q: Tensor) -> str:
    """The backend ``auto`` picks on this device and dtype: flash, then flex, then math.

    On an H100 at T=32K (S=4K, 25% ``all`` heads) forward+backward took 27 ms with flash, 38 ms with
    flex and 92 ms for full causal SDPA-flash (tools/bench_attention.py).
    """
    if backend == "auto":
        if q.dtype in _FLASH_DTYPES and flash_available(q.device) and torch.cuda.get_device_capability(q.device)[0] >= 9:
            return "flash"
        return "flex" if flex_available(q.device) and q.dtype in _FLEX_DTYPES else "math"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    return backend


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
) -> Tensor:
    """Segment attention over a whole sequence (the parallel form).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, T, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
        segment_size: tokens per segment ``S``; the last segment may be partial.
        policy: one history policy per KV head (strings like ``"sink:4+window:1024"`` or
            ``HeadPolicy``), or one for all heads.
        backend: ``auto``, ``reference``, ``math`` or ``flex``.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, Hq, T, D]`` in q's dtype.
    """
    check_qkv(q, k, v, segment_size)
    policies = as_head_policies(policy, k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return BACKENDS[resolve_backend(backend, q)](q, k, v, segment_size, policies, scale)
