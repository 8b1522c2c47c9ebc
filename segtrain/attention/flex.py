"""The ``flex`` backend: torch FlexAttention, compiled into block-sparse Triton kernels on the GPU.

One call over ``cat([K, K.detach()])`` (keys ``2T``): the first half holds the live keys (own and
previous segment, with gradient), the second half the same keys detached, read as history. The
mask makes the two halves disjoint, so one softmax runs over exactly the visible keys: no LSE merge,
and gradient never reaches history K/V. With ``carry_grad=False`` the previous segment moves to the
detached half too. The block mask is built from the segment structure in ``O(H * (T/128)^2)`` (never
by evaluating a ``T x T`` mask, which needed 64 GiB at T=32K) and cached per (T, S, policy). On CPU,
FlexAttention runs eagerly and forward only.

Public pieces context parallelism builds on (:mod:`segtrain.parallel.context_flex`): ``BLOCK``,
:func:`classify_blocks`, :func:`block_lists`, :func:`compiled_flex_attention`, :func:`run_flex`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from segtrain.policy import HeadPolicy, history_visible, policy_tensors

__all__ = [
    "BLOCK",
    "block_lists",
    "classify_blocks",
    "compiled_flex_attention",
    "flash_available",
    "flash_segment_attention",
    "flex_available",
    "flex_document_attention",
    "flex_segment_attention",
    "run_flex",
    "segment_block_mask",
    "segment_mask_mod",
]

BLOCK = 128


def segment_mask_mod(
    seq_len: int, segment_size: int, policies: Sequence[HeadPolicy], group: int, device, carry_grad: bool = True
):
    """Exact ``mask_mod`` over keys ``[live 0..T) | history T..2T)``; ``h`` is the query head."""
    all_, sink, window = policy_tensors(policies, device)
    T, S = seq_len, segment_size  # plain ints: constants in the kernel (flash-attn-4's codegen cannot load 0-dim buffers)
    carry_live = 1 if carry_grad else 0  # the previous segment is live (gradient) or read detached with the history

    def mask_mod(b, h, q_idx, kv_idx):
        in_history = kv_idx >= T
        j = torch.where(in_history, kv_idx - T, kv_idx)
        own = (q_idx // S) * S
        end = own - S  # start of the previous segment (negative in segment 0)
        live = (j >= own - carry_live * S) & (j <= q_idx)
        kv_head = h // group
        hist = history_visible(all_[kv_head], sink[kv_head], window[kv_head], j, end)
        if not carry_grad:
            hist = hist | ((j >= end) & (j < own))
        return torch.where(in_history, hist, live)

    return mask_mod


def classify_blocks(lo_first: Tensor, hi_first: Tensor, lo_last: Tensor, hi_last: Tensor, kv0: Tensor):
    """Blocks a family of row intervals touches / fully covers, given the first and last row's intervals.

    Interval ends grow with the row, so the union over a query block lies in ``[lo_first, hi_last)``
    and the intersection is ``[lo_last, hi_first)``. Over-marking a block as touched is safe (the
    exact mask_mod runs there); a full block must be truly all-visible.
    """
    kv1 = kv0 + BLOCK
    touched = (kv0 < hi_last[..., None]) & (kv1 > lo_first[..., None]) & (hi_last > lo_first)[..., None]
    full = (kv0 >= lo_last[..., None]) & (kv1 <= hi_first[..., None])
    return touched, full


def block_lists(full: Tensor, touched: Tensor, mask_mod, seq_lengths: tuple[int, int]) -> BlockMask:
    """A ``BlockMask`` from boolean ``[1, Hq, n_q, n_kv]`` maps of full and touched key blocks (touched includes full)."""
    partial = touched & ~full

    def lists(m: Tensor):
        return m.sum(-1, dtype=torch.int32), torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    (p_num, p_idx), (f_num, f_idx) = lists(partial), lists(full)
    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=seq_lengths)


def _history_intervals(rows: Tensor, S: int, policies: Sequence[HeadPolicy], carry_grad: bool):
    """Per KV head and row, the (lo, hi) of each detached component: all, sink, window (and the previous
    segment without ``carry_grad``). ``[H, n]`` each."""
    all_, sink, window = (t[:, None] for t in policy_tensors(policies, rows.device))
    end = ((rows // S - 1) * S).clamp(min=0)[None]
    zero = torch.zeros_like(end)
    parts = [
        (zero, torch.where(all_, end, zero)),
        (zero, torch.minimum(sink, end)),
        ((end - window).clamp(min=0), end),
    ]
    if not carry_grad:
        parts.append((end.expand(len(policies), -1), ((rows // S) * S)[None].expand(len(policies), -1)))
    return parts


@lru_cache(maxsize=8)
def segment_block_mask(
    seq_len: int, segment_size: int, policies: tuple[HeadPolicy, ...], group: int, device: str, carry_grad: bool = True
) -> BlockMask:
    """Block-sparse mask for ``seq_len`` (a multiple of ``BLOCK``) queries over ``2 * seq_len`` keys."""
    T, S, n = seq_len, segment_size, seq_len // BLOCK
    dev = torch.device(device)
    first = torch.arange(n, device=dev) * BLOCK
    last = first + BLOCK - 1
    kv0 = torch.arange(n, device=dev) * BLOCK
    back = 1 if carry_grad else 0  # live keys start at the previous segment, or at the own one

    def live_lo(rows):
        return (rows // S - back).clamp(min=0) * S

    live_t, live_f = classify_blocks(live_lo(first), first + 1, live_lo(last), last + 1, kv0)
    hist_t = hist_f = torch.zeros(len(policies), n, n, dtype=torch.bool, device=dev)
    for (lo_a, hi_a), (lo_b, hi_b) in zip(
        _history_intervals(first, S, policies, carry_grad), _history_intervals(last, S, policies, carry_grad)
    ):
        t, f = classify_blocks(lo_a, hi_a, lo_b, hi_b, kv0)
        hist_t, hist_f = hist_t | t, hist_f | f
    full = torch.cat([live_f.expand_as(hist_f), hist_f], -1)
    touched = torch.cat([live_t.expand_as(hist_t), hist_t], -1)
    full, touched = (m.repeat_interleave(group, dim=0)[None] for m in (full, touched))  # [1, Hq, n, 2n]
    return block_lists(full, touched, segment_mask_mod(T, S, policies, group, dev, carry_grad), (T, 2 * T))


@lru_cache(maxsize=1)
def compiled_flex_attention():
    """FlexAttention compiled once per process (eager FlexAttention ignores the block lists and is slow)."""
    return torch.compile(flex_attention, dynamic=False)


# The compiled call is specialised per shape (dynamic=False), and past Dynamo's recompile limit (8 by default) a call
# silently runs eager FlexAttention, which is dense: O(T^2) memory (a 16K test went past an H100's 80 GB after a
# dozen other shapes in one process). A process meets many shapes (tests, eval over lengths), so allow many more.
FLEX_RECOMPILE_LIMIT = 256


def run_flex(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float, kernels: str | None = "TRITON") -> Tensor:
    """One FlexAttention call: compiled on CUDA (``kernels``: TRITON, FLASH, or None for torch's default), eager elsewhere."""
    group = q.shape[1] // k.shape[1]
    if q.is_cuda:
        options = {} if kernels is None else {"kernel_options": {"BACKEND": kernels}}
        call = partial(compiled_flex_attention(), q, k, v, block_mask=mask, scale=scale, enable_gqa=group > 1, **options)
        if torch.compiler.is_compiling():  # inside a compiled region: the outer compile owns the limits
            return call()
        limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return call()
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=group > 1)


def flex_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


@lru_cache(maxsize=1)
def _flash_importable() -> bool:
    """Asked once: a failed import is not cached by Python, and ``auto`` asks on every attention call."""
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


def flash_available(device: torch.device) -> bool:
    """flash-attn-4's CuTe kernels (``flash_attn.cute``) on Hopper or newer, which FlexAttention can run our mask with."""
    return flex_available(device) and _flash_importable() and torch.cuda.get_device_capability(device)[0] >= 9


def _refuse_cpu_backward(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "backend='flex' has no backward on CPU (torch FlexAttention); use backend='math' for CPU training"
        )


def flex_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    policies: Sequence[HeadPolicy],
    scale: float,
    carry_grad: bool = True,
    kernels: str = "TRITON",
) -> Tensor:
    T = q.shape[2]
    _refuse_cpu_backward(q, k, v)
    T_pad = math.ceil(T / BLOCK) * BLOCK
    if T_pad != T:  # padded keys sit after every real query: causally invisible to all of them
        q, k, v = (F.pad(t, (0, 0, 0, T_pad - T)) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    mask = segment_block_mask(T_pad, segment_size, tuple(policies), group, str(q.device), carry_grad)
    kk, vv = torch.cat([k, k.detach()], 2), torch.cat([v, v.detach()], 2)
    return run_flex(q, kk, vv, mask, scale, kernels)[:, :, :T]


def document_mask_mod(
    seq_len: int, segment_size: int, policies: Sequence[HeadPolicy], group: int, ids: Tensor, pos: Tensor, carry_grad: bool
):
    """:func:`segment_mask_mod` read per document: positions are the document's own (``pos [B, T]``) and a key of
    another document (``ids [B, T]``) is never visible."""
    all_, sink, window = policy_tensors(policies, ids.device)
    T, S = seq_len, segment_size
    carry_live = 1 if carry_grad else 0

    def mask_mod(b, h, q_idx, kv_idx):
        in_history = kv_idx >= T
        j = torch.where(in_history, kv_idx - T, kv_idx)
        pq, pj = pos[b, q_idx], pos[b, j]
        own = (pq // S) * S
        end = own - S
        live = (pj >= own - carry_live * S) & (j <= q_idx)
        kv_head = h // group
        hist = history_visible(all_[kv_head], sink[kv_head], window[kv_head], pj, end)
        if not carry_grad:
            hist = hist | ((pj >= end) & (pj < own))
        return (ids[b, q_idx] == ids[b, j]) & torch.where(in_history, hist, live)

    return mask_mod


def _row_blocks(lo: Tensor, hi: Tensor, n_kv: int) -> tuple[Tensor, Tensor]:
    """Key blocks that each query block touches / fully covers, from every row's interval ``[lo, hi)`` (``[..., T]``,
    ``T`` a multiple of ``BLOCK``): exact per row, so it holds where rows of one block belong to different documents."""
    kv0 = torch.arange(n_kv, device=lo.device) * BLOCK
    lo, hi = lo[..., None], hi[..., None]
    touched = (kv0 < hi) & (kv0 + BLOCK > lo) & (hi > lo)
    full = (kv0 >= lo) & (kv0 + BLOCK <= hi)
    shape = touched.shape[:-2] + (touched.shape[-2] // BLOCK, BLOCK, n_kv)
    return touched.view(shape).any(-2), full.view(shape).all(-2)


def document_block_mask(ids: Tensor, pos: Tensor, segment_size: int, policies: tuple[HeadPolicy, ...], group: int,
                        carry_grad: bool) -> BlockMask:  # fmt: skip
    """Block-sparse mask of packed documents (``ids, pos [B, T]``, ``T`` a multiple of ``BLOCK``) over ``2T`` keys.

    Each row's visible keys are a few intervals inside its document (live: from its previous segment's start to
    itself; history: the policy's ranges), offset by where the document starts; a block no row reaches is skipped,
    so blocks across documents cost nothing.
    """
    B, T = pos.shape
    S, n = segment_size, T // BLOCK
    start = torch.arange(T, device=pos.device) - pos  # where each row's document starts
    back = 1 if carry_grad else 0
    live_t, live_f = _row_blocks(start + (pos // S - back).clamp(min=0) * S, torch.arange(1, T + 1, device=pos.device), n)
    hist_t = torch.zeros(len(policies), B, n, n, dtype=torch.bool, device=pos.device)
    hist_f = torch.zeros_like(hist_t)
    for policy in set(policies):  # heads with one policy share their blocks
        heads = [h for h, p in enumerate(policies) if p == policy]
        for lo, hi in _history_intervals(pos.flatten(), S, (policy,), carry_grad):
            lo, hi = (x.expand(1, B * T).view(B, T) + start for x in (lo, hi))
            t, f = _row_blocks(lo, hi, n)
            hist_t[heads] |= t
            hist_f[heads] |= f
    full = torch.cat([live_f.expand_as(hist_f), hist_f], -1)
    touched = torch.cat([live_t.expand_as(hist_t), hist_t], -1)
    full, touched = (m.transpose(0, 1).repeat_interleave(group, dim=1).contiguous() for m in (full, touched))  # [B, Hq, n, 2n]
    return block_lists(full, touched, document_mask_mod(T, S, policies, group, ids, pos, carry_grad), (T, 2 * T))


def flex_document_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    policies: Sequence[HeadPolicy],
    scale: float,
    carry_grad: bool,
    documents,
    kernels: str = "TRITON",
) -> Tensor:
    """:func:`flex_segment_attention` over packed documents (:class:`~segtrain.attention.documents.Documents`): the
    documents are in the mask, one call for the whole batch. Padding past ``T`` is one more document."""
    B, T = q.shape[0], q.shape[2]
    _refuse_cpu_backward(q, k, v)
    documents = documents.rows(B)
    T_pad = math.ceil(T / BLOCK) * BLOCK
    group = q.shape[1] // k.shape[1]
    key = ("flex", T_pad, segment_size, tuple(policies), group, carry_grad, str(q.device))
    if key not in documents.cache:
        pad = T_pad - T
        ids = F.pad(documents.ids.to(q.device), (0, pad), value=-1)
        pos = torch.cat([documents.positions.to(q.device), torch.arange(pad, device=q.device).expand(B, -1)], 1)
        documents.cache[key] = document_block_mask(ids, pos, segment_size, tuple(policies), group, carry_grad)
    if T_pad != T:
        q, k, v = (F.pad(t, (0, 0, 0, T_pad - T)) for t in (q, k, v))
    kk, vv = torch.cat([k, k.detach()], 2), torch.cat([v, v.detach()], 2)
    return run_flex(q, kk, vv, documents.cache[key], scale, kernels)[:, :, :T]


def flash_segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies: Sequence[HeadPolicy], scale: float, carry_grad: bool = True
) -> Tensor:
    """The flex formulation run by flash-attn-4's kernels (Hopper and newer)."""
    return flex_segment_attention(q, k, v, segment_size, policies, scale, carry_grad, kernels="FLASH")
