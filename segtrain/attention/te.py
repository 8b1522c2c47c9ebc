"""The ``te`` backend: segment attention run by Transformer Engine's fused attention (the one module that calls TE).

Per segment and per run of adjacent KV heads that read the same history (:func:`head_runs`), one
``DotProductAttention`` call over ``cat([history.detach(), previous, current])`` with a bottom-right
causal mask: a query at row ``i`` of ``Sq`` sees key ``j`` of ``Sk`` iff ``j <= Sk - Sq + i``, which
is every history and previous-segment key and the own segment causally, exactly the segment rule
(DESIGN.md §1). ``carry_grad=False`` detaches the previous segment with the history. The loop is
the ``math`` backend's (:func:`segment_loop`); only the kernel differs, so the decomposition is
tested on CPU with :func:`bottom_right_reference` in its place.

BF16/FP16 only, CUDA, head dim a multiple of 8 up to 256 (TE's fused kernels). FP8 attention
(``DelayedScaling(fp8_dpa=True)``) has no bottom-right causal mask on Hopper and is not wired yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from torch import Tensor

from segtrain.attention.segmented import segment_loop, sequence_history
from segtrain.policy import HeadPolicy

__all__ = ["bottom_right_reference", "te_available", "te_importable", "te_segment_attention"]

Kernel = Callable[[Tensor, Tensor, Tensor, float], Tensor]  # (q [B,Hq,Sq,D], k, v [B,Hkv,Sk,D], scale) -> out


@lru_cache(maxsize=1)
def te_importable() -> bool:
    """``transformer_engine.pytorch`` loads (asked once: a failed import is not cached by Python)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not load against this torch/cuDNN
        return False
    return True


def te_available(device: torch.device) -> bool:
    """Transformer Engine's PyTorch module importable, and ``device`` a CUDA GPU."""
    return device.type == "cuda" and torch.cuda.is_available() and te_importable()


def bottom_right_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """What the TE kernel computes, in plain PyTorch (GQA, bottom-right causal): the CPU tests' stand-in."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * Sq, D)
    scores = (qg @ k.transpose(-1, -2)).view(B, Hkv, Hq // Hkv, Sq, Sk) * scale
    rows, cols = torch.arange(Sq, device=q.device)[:, None], torch.arange(Sk, device=q.device)[None, :]
    scores = scores.masked_fill(cols > Sk - Sq + rows, -math.inf)
    p = torch.softmax(scores, dim=-1).view(B, Hkv, -1, Sk)
    return (p @ v).reshape(B, Hq, Sq, -1)


@lru_cache(maxsize=64)
def _dot_product_attention(heads: int, kv_heads: int, head_dim: int, scale: float, device: int):
    import transformer_engine.pytorch as te

    with torch.cuda.device(device):
        return te.DotProductAttention(
            heads,
            head_dim,
            num_gqa_groups=kv_heads,
            qkv_format="bshd",
            attn_mask_type="causal_bottom_right",
            softmax_scale=scale,
        )


def te_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One fused TE attention call, bottom-right causal, ``[B, H, S, D]`` in and out (TE reads ``bshd``)."""
    B, Hq, Sq, D = q.shape
    dpa = _dot_product_attention(Hq, k.shape[1], D, float(scale), q.device.index or 0)
    out = dpa(*(t.transpose(1, 2).clone(memory_format=torch.contiguous_format) for t in (q, k, v)))
    return out.view(B, Sq, Hq, -1).transpose(1, 2)


def _check(q: Tensor) -> None:
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='te' runs bf16 or fp16, got {q.dtype}; use backend='flex' or 'math' for {q.dtype}")
    if D % 8 or D > 256:
        raise ValueError(f"backend='te' needs a head dim that is a multiple of 8, at most 256; got {D}")


def te_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    policies: Sequence[HeadPolicy],
    scale: float,
    carry_grad: bool = True,
    kernel: Kernel | None = None,
) -> Tensor:
    """Segment attention with ``kernel`` (default: TE's fused attention) per segment and run of heads."""
    if kernel is None:
        _check(q)
        kernel = te_kernel

    def block(q, k_local, v_local, k_history, v_history, *, q_positions, local_positions, scale):
        if k_history is not None and k_history.shape[2] > 0:  # history (and a detached previous segment) first
            k_local = torch.cat([k_history.detach(), k_local], 2)
            v_local = torch.cat([v_history.detach(), v_local], 2)
        return kernel(q, k_local, v_local, scale), None

    return segment_loop(q, k, v, segment_size, policies, scale, sequence_history(k, v), carry_grad=carry_grad, block=block)
