"""Split-KV decoding attention over a per-head segment cache (flash-decoding), in Triton.

One query per row (a decoding step) against one layer's KV cache, where KV heads hold different
numbers of keys: an ``all`` head reads everything so far, the others a bounded set (sinks, a window,
the previous and the current segment). The cache layout is :class:`segtrain.inference.cache.HeadLayout`'s:
a layer's K (and V) is one buffer ``[B, slots, D]``; KV head ``h`` owns the slots
``[offset_h, offset_h + linear_h + ring_h)``. Position ``p < linear_h`` sits at ``offset_h + p``; a later
position at ``offset_h + linear_h + p mod ring_h``. A query at position ``t`` (segment ``s = t // S``)
sees the linear slots ``i <= t``, and each ring slot's latest position ``p <= t`` when
``p >= max(linear_h, history_end(s) - window_h)`` (DESIGN.md §1; ``history_end(s) = max(0, (s-1) S)``).

Stage 1 (``_partial_kernel``): a program per (row, KV head, split of that head's slots) streams its
slots once for all query heads of its GQA group (K and V read once) and writes a partial output
with its log-sum-exp. Loads outside the visible set are masked, so a
head reads only what it sees (an ``all`` head's unused tail and a ring's stale slots cost nothing).
Stage 2 (``_combine_kernel``) merges the splits of each query head exactly by log-sum-exp.

Everything is a device tensor or a launch constant: no host synchronisation, so a CUDA graph can
capture the call. On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, tests).

How the work is cut (:class:`Launch`: slots per inner iteration, warps, pipeline stages, programs per SM) changes
the speed, not the result. ``SEGTRAIN_DECODE_KERNEL="block=128,warps=8,stages=3,per_sm=8"`` overrides the default
for a whole process: what ``tools/tune_decode_attention.py`` measures a sweep of and passes to end-to-end benches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
from torch import Tensor

from segtrain.errors import UserError

__all__ = ["BLOCK_N", "ENV", "Launch", "available", "decode_attention", "default_launch", "split_size"]

BLOCK_N = 64  # slots per inner iteration
ENV = "SEGTRAIN_DECODE_KERNEL"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the engine falls back to the torch path
    triton = tl = None


def available(q: Tensor) -> bool:
    """Whether the kernel runs ``q``'s device, dtype and head size. CPU tensors run in Triton's interpreter, which
    must be switched on (``TRITON_INTERPRET=1``) before Triton is first imported: the tests do that."""
    D = q.shape[-1]
    device_ok = q.is_cuda or (triton is not None and triton.knobs.runtime.interpret)
    return triton is not None and device_ok and q.dtype in _DTYPES and D >= 16 and D & (D - 1) == 0


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, POS, HEADS, O_PART, LSE_PART,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
        n_kv_heads, segment_size, split, scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        chunk = tl.program_id(1)
        b = (pid // n_kv_heads).to(tl.int64)
        h = pid % n_kv_heads
        t = tl.load(POS + b).to(tl.int32)
        offset = tl.load(HEADS + h)
        linear = tl.load(HEADS + n_kv_heads + h)
        ring = tl.load(HEADS + 2 * n_kv_heads + h)
        window = tl.load(HEADS + 3 * n_kv_heads + h)
        ring_safe = tl.maximum(ring, 1)
        end = tl.maximum(t // segment_size - 1, 0) * segment_size  # history_end of t's segment
        lo_ring = tl.maximum(tl.maximum(end - window, 0), linear)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        q_rows = h * G + g
        q = tl.load(Q + b * stride_qb + q_rows[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)

        start = chunk * split
        stop = tl.minimum(start + split, linear + ring)
        # a split inside the linear part reads nothing past t
        stop = tl.minimum(stop, t + 1 + (stop > linear).to(tl.int32) * (linear + ring))
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for n0 in range(start, stop, BLOCK):
            i = n0 + tl.arange(0, BLOCK)
            r = i - linear
            p = t - ((t - r + ring_safe) % ring_safe)  # the ring slot's latest position <= t
            visible = tl.where(i < linear, i <= t, p >= lo_ring) & (i < stop)
            slot = (offset + i).to(tl.int64)
            k = tl.load(K + b * stride_kb + slot[:, None] * stride_ks + d[None, :], mask=visible[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            prob = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(prob, 1)
            v = tl.load(V + b * stride_vb + slot[:, None] * stride_vs + d[None, :], mask=visible[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(
            O_PART + b * stride_pb + q_rows[:, None] * stride_ph + chunk * stride_ps + d[None, :], out, mask=(g < G)[:, None]
        )
        tl.store(LSE_PART + b * stride_lb + q_rows * stride_lh + chunk, lse, mask=g < G)

    @triton.jit
    def _combine_kernel(
        O_PART, LSE_PART, OUT,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
        n_q_heads, n_chunks,
        D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = (pid // n_q_heads).to(tl.int64)
        h = pid % n_q_heads
        s_off = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        m = tl.full([1], float("-inf"), tl.float32)  # running max of the splits' log-sum-exps
        den = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, n_chunks, BLOCK_S):  # one pass, rescaling as the max grows
            ok = s0 + s_off < n_chunks
            lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + s0 + s_off, mask=ok, other=float("-inf"))
            o = tl.load(
                O_PART + b * stride_pb + h * stride_ph + (s0 + s_off)[:, None] * stride_ps + d[None, :],
                mask=ok[:, None],
                other=0.0,
            )
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            w = tl.exp(lse - m_safe)
            den = den * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)
        tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))


@dataclass(frozen=True)
class Launch:
    """How one call is cut into programs; each choice gives the same result, only the speed differs."""

    # the defaults: the lowest total time over 8B-shape steps at 128K and 32K, batch 1 and 16, in
    # tools/tune_decode_attention.py's sweep of 48 launches on an H100 (docs/bench/README.md, Decoding)
    block: int = BLOCK_N  # slots per inner iteration (a power of two, at least 16: the tile of tl.dot)
    warps: int = 4  # warps per program
    stages: int = 3  # software-pipeline stages of the K/V loads
    per_sm: int = 2  # programs per SM that all rows' slots are spread over

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"decode kernel launch: {f.name} must be a positive integer, got {value!r}")
        if self.block < 16 or self.block & (self.block - 1):
            raise UserError(f"decode kernel launch: block must be a power of two >= 16, got {self.block}")

    @classmethod
    def parse(cls, spec: str) -> Launch:
        """``"block=128,warps=8"`` (fields left out keep their defaults)."""
        names = {f.name for f in fields(cls)}
        values = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, _, value = item.partition("=")
            if key.strip() not in names or not value.strip().isdigit():
                raise UserError(f"{ENV}: {item!r} is not one of {sorted(names)} = a positive integer (got {spec!r})")
            values[key.strip()] = int(value)
        return cls(**values)

    def spec(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@lru_cache(maxsize=8)
def _parsed(spec: str) -> Launch:
    return Launch.parse(spec)


def default_launch() -> Launch:
    """:class:`Launch`'s defaults, or ``$SEGTRAIN_DECODE_KERNEL``'s fields where it is set."""
    spec = os.environ.get(ENV, "")
    return _parsed(spec) if spec.strip() else Launch()


def _programs_wanted(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return per_sm


def split_size(batch: int, total_slots: int, device: torch.device, launch: Launch | None = None) -> int:
    """Slots per program: about ``launch.per_sm`` programs per SM over all rows' slots, a multiple of ``launch.block``."""
    launch = launch or default_launch()
    per_program = math.ceil(batch * max(total_slots, 1) / _programs_wanted(device, launch.per_sm))
    return launch.block * max(1, math.ceil(per_program / launch.block))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    heads: Tensor,
    *,
    max_capacity: int,
    total_slots: int,
    segment_size: int,
    scale: float,
    split: int | None = None,
    launch: Launch | None = None,
) -> Tensor:
    """One decoding step's attention over a layer's segment cache (layout in the module docstring).

    Args:
        q: ``[B, Hq, D]``, the queries at ``positions`` (their own K/V already stored in the cache).
        k_cache, v_cache: ``[B, slots, D]``, the layer's buffers (last dim contiguous).
        positions: ``[B]`` integer, each row's query position.
        heads: ``[4, Hkv]`` int32 on q's device: ``offset, linear, ring, window`` per KV head.
        max_capacity: the largest ``linear + ring`` of any head; total_slots: their sum over heads
            (host ints, so that the launch needs no synchronisation).
        split: slots per program (default :func:`split_size`).
        launch: how the call is cut into programs (default :func:`default_launch`).

    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    B, Hq, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dimension")
    launch = launch or default_launch()
    split = split or split_size(B, total_slots, q.device, launch)
    n_chunks = max(1, math.ceil(max_capacity / split))
    o_part = torch.empty(B, Hq, n_chunks, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, n_chunks, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _launch(q, k_cache, v_cache, positions, heads, o_part, lse_part, out, segment_size, split, scale, launch)
    return out


def _launch(q, k_cache, v_cache, positions, heads, o_part, lse_part, out, segment_size, split, scale, launch: Launch) -> None:
    B, Hq, D = q.shape
    Hkv = heads.shape[1]
    G, n_chunks = Hq // Hkv, o_part.shape[2]
    _partial_kernel[(B * Hkv, n_chunks)](
        q, k_cache, v_cache, positions, heads, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        Hkv, segment_size, split, scale,
        G=G, G_PAD=max(16, 1 << (G - 1).bit_length()), D=D, BLOCK=launch.block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=launch.warps, num_stages=launch.stages,
    )  # fmt: skip
    _combine_kernel[(B * Hq,)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), Hq, n_chunks,
        D=D, BLOCK_S=32, num_warps=4,
    )  # fmt: skip
