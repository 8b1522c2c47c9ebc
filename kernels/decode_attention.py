"""Split-KV decoding attention over a per-head segment cache (flash-decoding), in Triton.

One query per row (a decoding step) against one layer's KV cache, where KV heads hold different
numbers of keys: an ``all`` head reads everything so far, the others a bounded set (sinks, a window,
the previous and the current segment). The cache layout is :class:`segtrain.inference.cache.HeadLayout`'s:
a layer's K (and V) is one buffer ``[B, slots, D]``; KV head ``h`` owns the slots
``[offset_h, offset_h + linear_h + ring_h)``. Position ``p < linear_h`` sits at ``offset_h + p``; a later
position at ``offset_h + linear_h + p mod ring_h``. A query at position ``t`` (segment ``s = t // S``)
sees the linear slots ``i <= t``, and each ring slot's latest position ``p <= t`` when
``p >= max(linear_h, history_end(s) - window_h)`` (DESIGN.md §1; ``history_end(s) = max(0, (s-1) S)``).

A program per (row, KV head, split of that head's slots) streams its slots once for all query heads
of its GQA group (K and V read once) and writes a partial output with its log-sum-exp. Loads outside
the visible set are masked, so a head reads only what it sees (an ``all`` head's unused tail and a
ring's stale slots cost nothing). A second launch (``_combine_kernel``) merges each query head's
splits exactly by log-sum-exp; with ``Launch(merge=1)`` the last of a head's programs to finish (an
atomic count per row and KV head) merges them instead, in the same launch. Given the step's own K/V
(``Launch.store``: the cache hands them over), the first split stores them in the cache and starts
from them, and the others skip that slot: no separate store launches.

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
        Q, K, V, K_NEW, V_NEW, POS, HEADS, O_PART, LSE_PART, COUNTERS, OUT,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_vb, stride_vs, stride_knb, stride_knh, stride_vnb, stride_vnh,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
        n_kv_heads, segment_size, split, scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
        STORE: tl.constexpr, MERGE: tl.constexpr, G_POW2: tl.constexpr, BLOCK_C: tl.constexpr,
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
        # with MERGE, a head's splits past its own slots do nothing (the merge reads only the head's n_splits)
        n_splits = tl.maximum(tl.cdiv(linear + ring, split), 1)
        live = n_splits if MERGE else chunk + 1
        if chunk < live:
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
            own = -1  # with STORE: the step's own slot, which the loop skips (split 0 adds the step's key from K_NEW)
            if STORE:
                own = tl.where(t < linear, t, linear + t % ring_safe)
                k_new = tl.load(K_NEW + b * stride_knb + h * stride_knh + d)
                v_new = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + d)
                first = (chunk == 0) & (t >= 0)
                if first:  # no other program reads this slot in this launch: they skip it
                    tl.store(K + b * stride_kb + (offset + own).to(tl.int64) * stride_ks + d, k_new)
                    tl.store(V + b * stride_vb + (offset + own).to(tl.int64) * stride_vs + d, v_new)
                s_own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
                m_i = tl.where(first, s_own, m_i)
                l_i = tl.where(first, 1.0, l_i)
                acc = tl.where(first, acc + v_new.to(tl.float32)[None, :], acc)
            for n0 in range(start, stop, BLOCK):
                i = n0 + tl.arange(0, BLOCK)
                r = i - linear
                p = t - ((t - r + ring_safe) % ring_safe)  # the ring slot's latest position <= t
                visible = tl.where(i < linear, i <= t, p >= lo_ring) & (i < stop) & (i != own)
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
            if MERGE:
                # the last of the head's splits to finish merges them all (and resets the count for the next launch):
                # every thread's stores above come before the count's release
                tl.debug_barrier()
                if tl.atomic_add(COUNTERS + pid, 1) == n_splits - 1:
                    tl.atomic_xchg(COUNTERS + pid, 0)
                    _merge(
                        O_PART + b * stride_pb + h * G * stride_ph, LSE_PART + b * stride_lb + h * G * stride_lh,
                        OUT + b * stride_ob + h * G * stride_oh, stride_ph, stride_ps, stride_lh, stride_oh, n_splits,
                        G, G_POW2, D, BLOCK_C, ".cg",
                    )  # fmt: skip

    @triton.jit
    def _merge(O_PART, LSE_PART, OUT, stride_ph, stride_ps, stride_lh, stride_oh, n_splits,
               G: tl.constexpr, G_POW2: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
        """Exact log-sum-exp merge of ``n_splits`` partial outputs of ``G`` query heads (pointers at the first head)."""
        g = tl.arange(0, G_POW2)
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, D)
        m = tl.full([G_POW2], float("-inf"), tl.float32)  # running max of the splits' log-sum-exps
        den = tl.zeros([G_POW2], tl.float32)
        acc = tl.zeros([G_POW2, D], tl.float32)
        for c0 in range(0, n_splits, BLOCK_C):  # one pass, rescaling as the max grows
            ok = (g < G)[:, None] & (c0 + c < n_splits)[None, :]
            lse = tl.load(
                LSE_PART + g[:, None] * stride_lh + (c0 + c)[None, :], mask=ok, other=float("-inf"), cache_modifier=CACHE
            )
            o = tl.load(
                O_PART + g[:, None, None] * stride_ph + (c0 + c)[None, :, None] * stride_ps + d[None, None, :],
                mask=ok[:, :, None],
                other=0.0,
                cache_modifier=CACHE,
            )
            m_new = tl.maximum(m, tl.max(lse, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            w = tl.exp(lse - m_safe[:, None])
            den = den * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(OUT + g[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty), mask=(g < G)[:, None])

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
        _merge(
            O_PART + b * stride_pb + h * stride_ph, LSE_PART + b * stride_lb + h * stride_lh, OUT + b * stride_ob + h * stride_oh,
            stride_ph, stride_ps, stride_lh, stride_oh, n_chunks, 1, 1, D, BLOCK_S, "",
        )  # fmt: skip


_SWITCHES = ("store", "merge")  # Launch's 0/1 fields


@dataclass(frozen=True)
class Launch:
    """How one call is cut into programs; each choice gives the same result, only the speed differs."""

    # the defaults: the lowest total time over 8B-shape steps at 128K and 32K, batch 1 and 16, in
    # tools/tune_decode_attention.py's sweep of 48 launches on an H100 (docs/bench/README.md, Decoding)
    block: int = BLOCK_N  # slots per inner iteration (a power of two, at least 16: the tile of tl.dot)
    warps: int = 4  # warps per program
    stages: int = 3  # software-pipeline stages of the K/V loads
    per_sm: int = 2  # programs per SM that all rows' slots are spread over
    # 1: the cache hands the step's K/V to the kernel, which stores them (0: the cache stores them first, by indexing)
    store: int = 1
    # 1: the last split of each KV head to finish merges them, in the same launch (0: a second launch merges). On an
    # H100 the in-kernel merge was the slower (docs/bench/README.md, Decoding): its registers cost the split loop
    merge: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SWITCHES:
                if value not in (0, 1):
                    raise UserError(f"decode kernel launch: {f.name} must be 0 or 1, got {value!r}")
            elif not isinstance(value, int) or value < 1:
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
                raise UserError(f"{ENV}: {item!r} is not one of {sorted(names)} = an integer (got {spec!r})")
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
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    counters: Tensor | None = None,
) -> Tensor:
    """One decoding step's attention over a layer's segment cache (layout in the module docstring).

    Args:
        q: ``[B, Hq, D]``, the queries at ``positions``.
        k_cache, v_cache: ``[B, slots, D]``, the layer's buffers (last dim contiguous).
        positions: ``[B]`` integer, each row's query position (-1: the row sits the step out).
        heads: ``[4, Hkv]`` int32 on q's device: ``offset, linear, ring, window`` per KV head.
        max_capacity: the largest ``linear + ring`` of any head; total_slots: their sum over heads
            (host ints, so that the launch needs no synchronisation).
        split: slots per program (default :func:`split_size`).
        launch: how the call is cut into programs (default :func:`default_launch`).
        k_new, v_new: ``[B, Hkv, D]``, the step's own K/V: the call stores them at ``positions`` (and reads them
            from there). Without them, the cache holds them already.
        counters: ``[>= B * Hkv]`` int32 zeros that a call with ``launch.merge`` counts finished splits in and leaves
            at zero (a caller that decodes many steps keeps one; default: a new one per call).

    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    B, Hq, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dimension")
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new, or neither")
    if k_new is not None and (k_new.stride(-1) != 1 or v_new.stride(-1) != 1):
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    launch = launch or default_launch()
    if launch.merge and counters is None:
        counters = torch.zeros(B * heads.shape[1], dtype=torch.int32, device=q.device)
    split = split or split_size(B, total_slots, q.device, launch)
    n_chunks = max(1, math.ceil(max_capacity / split))
    o_part = torch.empty(B, Hq, n_chunks, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, n_chunks, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    Hkv = heads.shape[1]
    G = Hq // Hkv
    G_POW2 = 1 << (G - 1).bit_length()
    store = k_new is not None
    k_new, v_new = (k_new, v_new) if store else (k_cache, v_cache)  # unread without STORE
    counters = counters if launch.merge else lse_part  # unread without MERGE
    _partial_kernel[(B * Hkv, n_chunks)](
        q, k_cache, v_cache, k_new, v_new, positions, heads, o_part, lse_part, counters, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        Hkv, segment_size, split, scale,
        G=G, G_PAD=max(16, G_POW2), D=D, BLOCK=launch.block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STORE=store, MERGE=bool(launch.merge), G_POW2=G_POW2, BLOCK_C=min(32, max(1, 8192 // (G_POW2 * D))),
        num_warps=launch.warps, num_stages=launch.stages,
    )  # fmt: skip
    if not launch.merge:
        _combine_kernel[(B * Hq,)](
            o_part, lse_part, out,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), Hq, n_chunks,
            D=D, BLOCK_S=32, num_warps=4,
        )  # fmt: skip
    return out
