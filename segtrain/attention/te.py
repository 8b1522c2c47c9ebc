"""The ``te`` backend: segment attention run by Transformer Engine's fused attention (the one module that calls TE).

Per segment and per run of adjacent KV heads that read the same history (:func:`head_runs`), one
``DotProductAttention`` call over ``cat([history.detach(), previous, current])`` with a bottom-right
causal mask: a query at row ``i`` of ``Sq`` sees key ``j`` of ``Sk`` iff ``j <= Sk - Sq + i``, which
is every history and previous-segment key and the own segment causally, exactly the segment rule
(DESIGN.md §1). ``carry_grad=False`` detaches the previous segment with the history. The loop is
the ``math`` backend's (:func:`segment_loop`); only the kernel differs, so the decomposition is
tested on CPU with :func:`bottom_right_reference` in its place.

BF16/FP16 only, CUDA, head dim a multiple of 8 up to 256 (TE's fused kernels).

The ``te-fp8`` backend (:func:`te_fp8_segment_attention`) runs the forward in FP8. On Hopper TE's FP8
attention has no bottom-right causal mask, so each segment and run of heads is two tiles: the own
segment (``causal``, square) and the past, ``[history.detach(), previous]`` (``no_mask``), merged by
their log-sum-exps in float32. The backward runs TE's BF16 kernels per tile with the merged output and
LSE (TE's "FP8 forward, F16 backward" mode), on the FP8-rounded Q, K, V the forward saw. Scales need
no amax history: Q, K, V are rounded to FP8 once per call, each scaled by its own amax (a power of two,
so the rounded BF16 tensors hold exactly the FP8 values and each tile casts them exactly), the softmax
probabilities by 448 (they are at most 1) and each tile's output by V's scale (an output row is a convex
combination of V rows). Hopper trains FP8 attention at head dim 128 only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from segtrain.attention.block import merge_partials
from segtrain.attention.segmented import segment_loop, sequence_history
from segtrain.policy import HeadPolicy

__all__ = [
    "TileKernels",
    "bottom_right_reference",
    "reference_tiles",
    "te_available",
    "te_fp8_segment_attention",
    "te_importable",
    "te_segment_attention",
]

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


def _history_first(k_history: Tensor | None, v_history: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``[history.detach(), k]`` (and v): the keys every query of the segment sees, history first."""
    if k_history is None or k_history.shape[2] == 0:
        return k, v
    return torch.cat([k_history.detach(), k], 2), torch.cat([v_history.detach(), v], 2)


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
        k_local, v_local = _history_first(k_history, v_history, k_local, v_local)  # (and a detached previous segment)
        return kernel(q, k_local, v_local, scale), None

    return segment_loop(q, k, v, segment_size, policies, scale, sequence_history(k, v), carry_grad=carry_grad, block=block)


# ---------------------------------------------------------------------------------------------------------------
# te-fp8: two tiles per segment and run of heads (own segment causal, past no_mask), merged by LSE


@dataclass(frozen=True)
class TileKernels:
    """How the two tiles run (``[B, H, S, D]`` in and out; ``causal``: the square own-segment tile).

    ``prepare(q, k, v) -> (q, k, v, scales)`` once per call: TE's rounds each tensor to FP8 values (gradient passed
    straight through) and returns their scales. ``forward(q, k, v, scale, causal, scales) -> (out float32, lse
    [B, Hq, Sq] float32)``; ``backward(q, k, v, out, dout, lse, scale, causal) -> (dq, dk, dv)`` from the merged
    ``out`` and ``lse``.
    """

    prepare: Callable[..., tuple[Tensor, Tensor, Tensor, object]]
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _reference_tile_scores(q, k, v, scale, causal):
    """Scaled scores of one tile (square and causal, or all visible), with K and V repeated over each GQA group."""
    G = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ ke.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return s, ke, ve


def _reference_tile_forward(q, k, v, scale, causal, scales=None):
    s, _, ve = _reference_tile_scores(q, k, v, scale, causal)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ ve, lse


def _reference_tile_backward(q, k, v, out, dout, lse, scale, causal):
    """The flash-attention backward of one tile given the merged output and LSE: ``P = exp(S - lse)``."""
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    s, ke, ve = _reference_tile_scores(q, k, v, scale, causal)
    p = torch.exp(s - lse[..., None])
    dp = dout @ ve.transpose(-1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    dq = scale * ds @ ke
    dk = (scale * ds.transpose(-1, -2) @ q).unflatten(1, (Hkv, G)).sum(2)
    dv = (p.transpose(-1, -2) @ dout).unflatten(1, (Hkv, G)).sum(2)
    return dq, dk, dv


# plain PyTorch in exact arithmetic: the CPU tests' stand-in
reference_tiles = TileKernels(lambda q, k, v: (q, k, v, None), _reference_tile_forward, _reference_tile_backward)


class _TwoTileAttention(torch.autograd.Function):
    """Queries of one segment over the own-segment tile (causal) and the past tile (all visible), merged by LSE;
    backward per tile with the merged output and LSE. ``k_past``/``v_past`` may be None (segment 0)."""

    @staticmethod
    def forward(ctx, q, k_own, v_own, k_past, v_past, scale, kernels, scales):
        tiles = [(k_own, v_own, True)] + ([(k_past, v_past, False)] if k_past is not None else [])
        out, lse = None, None
        for k, v, causal in tiles:
            o, o_lse = kernels.forward(q, k, v, scale, causal, scales)
            out, lse = (o, o_lse) if out is None else merge_partials(out, lse, o, o_lse)
        out = out.to(q.dtype)
        ctx.scale, ctx.kernels, ctx.causal = scale, kernels, [c for _, _, c in tiles]
        ctx.save_for_backward(out, lse, q, *(t for k, v, _ in tiles for t in (k, v)))
        return out

    @staticmethod
    def backward(ctx, dout):
        out, lse, q, *kv = ctx.saved_tensors
        dout = dout.contiguous()
        grads, dq = [], None
        for i, causal in enumerate(ctx.causal):
            dq_t, dk, dv = ctx.kernels.backward(q, kv[2 * i], kv[2 * i + 1], out, dout, lse, ctx.scale, causal)
            dq = dq_t if dq is None else dq + dq_t
            grads += [dk, dv]
        if len(grads) == 2:
            grads += [None, None]
        return (dq, *grads, None, None, None)


E4M3_MAX = 448.0


class _RoundToFp8(torch.autograd.Function):
    """``x`` rounded to E4M3 values times ``1/scale`` (exact in x's dtype: ``scale`` is a power of two); the gradient
    passes straight through, as FP8 training treats its casts."""

    @staticmethod
    def forward(ctx, x, scale):
        return ((x.float() * scale).to(torch.float8_e4m3fn).float() / scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _pow2_scale(x: Tensor, fmax: float) -> Tensor:
    """``[1]`` float32: the largest power of two that maps ``max |x|`` into ``fmax`` (a zero tensor gets 2^100)."""
    amax = x.detach().abs().amax().float().clamp_min(2.0**-100)
    return torch.exp2(torch.floor(torch.log2(fmax / amax))).reshape(1)


def _te_fp8_prepare(q, k, v):
    """Q, K, V rounded to FP8 once for the whole sequence (current scaling, power-of-two scales): every tile then
    casts exactly, with no amax of its own, and the BF16 backward reads exactly the values the FP8 forward did."""
    scales = tuple(_pow2_scale(t, E4M3_MAX) for t in (q, k, v))
    q, k, v = (_RoundToFp8.apply(t, s) for t, s in zip((q, k, v), scales))
    return q, k, v, scales


def _quantizer(scale: Tensor):
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    quantizer = Float8Quantizer(scale=scale, amax=torch.zeros(1, device=scale.device), fp8_dtype=tex.DType.kFloat8E4M3)
    quantizer.set_usage(rowwise=True, columnwise=False)
    return quantizer


def _bshd(t: Tensor) -> Tensor:
    return t.transpose(1, 2).contiguous()


def _cu_seqlens(batch: int, length: int, device) -> Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _te_fp8_tile_forward(q, k, v, scale, causal, scales):
    """One tile on TE's FP8 fused attention (E4M3 Q, K, V, P and output); ``out`` dequantized to float32.

    P is scaled by 448 (it is at most 1), the output by V's scale (a row of it is a convex combination of V's rows).
    """
    from transformer_engine.pytorch.cpp_extensions.fused_attn import FusedAttnBackend, fused_attn_fwd

    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    fp8 = [_quantizer(s)(_bshd(t)) for t, s in zip((q, k, v), scales)]
    out, aux, *_ = fused_attn_fwd(
        True, Sq, Sk, _cu_seqlens(B, Sq, q.device), _cu_seqlens(B, Sk, q.device), *fp8,
        fake_dtype=q.dtype, fused_attention_backend=FusedAttnBackend["FP8"],
        s_quantizer=_quantizer(torch.full((1,), E4M3_MAX, device=q.device)), o_quantizer=_quantizer(scales[2]),
        attn_scale=scale, dropout=0.0, qkv_layout="bshd_bshd_bshd", o_format="bshd",
        attn_mask_type="causal" if causal else "no_mask",
    )  # fmt: skip
    return out.dequantize(dtype=torch.float32).view(B, Sq, Hq, -1).transpose(1, 2), aux[0].view(B, Hq, Sq)


def _te_bf16_tile_backward(q, k, v, out, dout, lse, scale, causal):
    """One tile's backward on TE's BF16 fused attention, from the merged ``out`` and ``lse``."""
    from transformer_engine.pytorch.cpp_extensions.fused_attn import FusedAttnBackend, fused_attn_bwd

    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)  # no dropout: never read
    dq, dk, dv, *_ = fused_attn_bwd(
        Sq, Sk, _cu_seqlens(B, Sq, q.device), _cu_seqlens(B, Sk, q.device), *(_bshd(t) for t in (q, k, v, out, dout)),
        q.dtype, [lse.float().reshape(B, Hq, Sq, 1).contiguous(), rng_state], FusedAttnBackend["F16_arbitrary_seqlen"],
        attn_scale=scale, dropout=0.0, qkv_layout="bshd_bshd_bshd", o_format="bshd", do_format="bshd",
        dqkv_layout="bshd_bshd_bshd", attn_mask_type="causal" if causal else "no_mask",
    )  # fmt: skip
    return tuple(t.transpose(1, 2) for t in (dq, dk, dv))


te_fp8_tiles = TileKernels(_te_fp8_prepare, _te_fp8_tile_forward, _te_bf16_tile_backward)


def _check_fp8(q: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='te-fp8' takes bf16 or fp16 activations, got {q.dtype}")
    if q.shape[-1] != 128:
        raise ValueError(
            f"backend='te-fp8' needs head dim 128 (TE's FP8 attention trains at 128 only on Hopper), got {q.shape[-1]}; "
            "use backend='te' or 'flash'"
        )


def te_fp8_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    policies: Sequence[HeadPolicy],
    scale: float,
    carry_grad: bool = True,
    kernels: TileKernels | None = None,
) -> Tensor:
    """Segment attention with an FP8 forward (module docstring); ``kernels`` (default: TE's) run the two tiles."""
    if kernels is None:
        _check_fp8(q)
        kernels = te_fp8_tiles
    q, k, v, scales = kernels.prepare(q, k, v)

    def block(q, k_local, v_local, k_history, v_history, *, q_positions, local_positions, scale):
        Sq = q.shape[2]
        k_own, v_own = k_local[:, :, -Sq:], v_local[:, :, -Sq:]
        # history, then the live previous segment (either may be empty)
        k_past, v_past = _history_first(k_history, v_history, k_local[:, :, :-Sq], v_local[:, :, :-Sq])
        if k_past.shape[2] == 0:
            k_past = v_past = None
        return _TwoTileAttention.apply(q, k_own, v_own, k_past, v_past, scale, kernels, scales), None

    return segment_loop(q, k, v, segment_size, policies, scale, sequence_history(k, v), carry_grad=carry_grad, block=block)
