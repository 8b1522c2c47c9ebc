"""The GPU path of context-parallel attention: one FlexAttention call per rank instead of the segment loop.

Keys are ``[live | bank]``: the live K/V at positions ``[base, hi)`` (the carried segment and this
rank's own tokens, with gradient) and the detached history bank (remote history slots, then the own
keys again; see ``context._history_bank``). The exact ``mask_mod`` makes the two parts disjoint (live:
previous segment and causal own segment; bank: what each head's policy reads), so one softmax runs
over exactly the visible keys, with no LSE merge, like the ``flex`` backend. The block lists are
built from the segment structure: a 128-row query block spans at most two segments (``S`` is a
multiple of 128), so history visibility per key block needs only the distinct history ends.

In document mode (:func:`cp_document_block_mask`) the mask also reads each query's and each key slot's document
and in-document position (a key received from an earlier rank belongs to the row's first document when it lies
after that document's start), and the block lists come from every query row's exact key intervals, so blocks
between documents are skipped; the mask is built once per forward (cached on the ``Documents``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from segtrain.attention.flex import BLOCK, _history_intervals, block_lists, classify_blocks, run_flex
from segtrain.parallel.share import LiveKV, RankShare
from segtrain.policy import HeadPolicy, history_visible, policy_tensors

__all__ = ["clear_mask_cache", "cp_block_mask", "cp_document_block_mask", "flex_cp_attention", "head_index", "take_heads"]

_CACHE: dict[tuple, tuple[BlockMask, int, int]] = {}


def clear_mask_cache() -> None:
    """Drop the cached block masks (one per split, policy set and device; a training run reuses its few)."""
    _CACHE.clear()


def _ceil(n: int) -> int:
    return math.ceil(n / BLOCK) * BLOCK


def cp_block_mask(
    lo: int, hi: int, base: int, segment_size: int, policies: Sequence[HeadPolicy], group: int, positions: Tensor | None, device
) -> tuple[BlockMask, int, int]:
    """Block mask of queries ``[lo, hi)`` over ``[live | bank]`` keys; returns ``(mask, live_pad, bank_pad)``.

    ``positions [Hkv, N]``: the absolute position of each bank slot per KV head (-1: empty), or None.
    """
    S, G, Hkv = segment_size, group, len(policies)
    Tq, L, N = _ceil(hi - lo), hi - base, 0 if positions is None else positions.shape[1]
    L_pad, N_pad = _ceil(L), _ceil(N)
    dev = torch.device(device)
    pos = torch.full((Hkv, max(N_pad, 1)), -1, dtype=torch.long)
    if N:
        pos[:, :N] = positions
    pos = pos.to(dev)
    all_, sink, window = policy_tensors(policies, dev)

    def mask_mod(b, h, q_idx, kv_idx):
        r = q_idx + lo
        end = (r // S - 1) * S
        j = kv_idx + base
        live = (kv_idx < L) & (j >= end) & (j <= r)
        kvh = h // G
        p = pos[kvh, (kv_idx - L_pad).clamp(min=0, max=pos.shape[1] - 1)]
        hist = (kv_idx < L_pad + N) & (p >= 0) & history_visible(all_[kvh], sink[kvh], window[kvh], p, end)
        return torch.where(kv_idx >= L_pad, hist, live)

    nq = Tq // BLOCK
    first = lo + torch.arange(nq, device=dev) * BLOCK  # absolute positions of each query block's first and last row
    last = first + BLOCK - 1
    end_first, end_last = (first // S - 1) * S, (last // S - 1) * S
    kv0 = torch.arange(L_pad // BLOCK, device=dev) * BLOCK

    def live_interval(rows, ends):  # in slot coordinates, clipped to the live keys
        return (ends - base).clamp(min=0), (rows + 1 - base).clamp(max=L)

    live_t, live_f = classify_blocks(*live_interval(first, end_first), *live_interval(last, end_last), kv0)  # [nq, L_pad/B]
    full, touched = [live_f.expand(Hkv, -1, -1)], [live_t.expand(Hkv, -1, -1)]
    if N:
        ends = torch.unique(torch.cat([end_first, end_last]).clamp(min=0))  # a few: one per segment
        vis = (pos[None] >= 0) & history_visible(
            all_[None, :, None], sink[None, :, None], window[None, :, None], pos[None], ends[:, None, None]
        )
        vis = vis[:, :, :N_pad].reshape(len(ends), Hkv, N_pad // BLOCK, BLOCK)
        any_, all_b = vis.any(-1), vis.all(-1)  # [E, Hkv, N_pad/B]
        i_first, i_last = torch.searchsorted(ends, end_first.clamp(min=0)), torch.searchsorted(ends, end_last.clamp(min=0))
        touched.append((any_[i_first] | any_[i_last]).permute(1, 0, 2))
        full.append((all_b[i_first] & all_b[i_last]).permute(1, 0, 2))
    full_m, touched_m = (torch.cat(m, -1).repeat_interleave(G, dim=0)[None].contiguous() for m in (full, touched))
    return block_lists(full_m, touched_m, mask_mod, (Tq, L_pad + N_pad)), L_pad, N_pad


def _bucket(n: int, unit: int) -> int:
    """``n`` rounded up to ``unit`` times 1, 2, 3, 4, 6, 8, 12, ... (at most 50% more): few distinct key lengths, so the
    compiled FlexAttention (static shapes) recompiles a few times per rank, not for every new document layout."""
    k = math.ceil(n / unit)
    if k <= 2:
        return k * unit
    step = 2 ** (k.bit_length() - 2)  # k / step in [2, 4): round up to 2, 3 or 4 steps
    return math.ceil(k / step) * step * unit


def _interval_blocks(lo: Tensor, hi: Tensor, n_kv: int) -> tuple[Tensor, Tensor]:
    """Key blocks each query block touches / fully covers, from every query row's key interval ``[lo, hi)``.

    ``lo, hi [..., Tq]`` (``Tq`` a multiple of ``BLOCK``) give ``[..., Tq / BLOCK, n_kv]``: exact per row, so it holds
    where the rows of one block belong to different documents. Counted with difference arrays: memory is the
    block map's, never ``Tq x n_kv``.
    """
    lo, hi = torch.broadcast_tensors(lo, hi)
    shape = (*lo.shape[:-1], lo.shape[-1] // BLOCK, BLOCK)
    some = hi > lo

    def rows_covering(first: Tensor, stop: Tensor) -> Tensor:  # per query block and key block: rows with it in [first, stop)
        count = (some & (stop > first)).to(torch.int32).reshape(shape)
        diff = torch.zeros(*shape[:-1], n_kv + 1, dtype=torch.int32, device=lo.device)
        diff.scatter_add_(-1, first.clamp(0, n_kv).reshape(shape), count)
        diff.scatter_add_(-1, stop.clamp(0, n_kv).reshape(shape), -count)
        return diff.cumsum(-1)[..., :n_kv]

    touched = rows_covering(lo // BLOCK, (hi + BLOCK - 1) // BLOCK) > 0
    full = rows_covering((lo + BLOCK - 1) // BLOCK, hi // BLOCK) == BLOCK
    return touched, full


def _key_documents(ids: Tensor, pos: Tensor, lo: int, slots: Tensor) -> tuple[Tensor, Tensor]:
    """``(document, in-document position)`` of key slots at absolute positions ``slots [Hkv, K]`` (-1: empty), per row:
    ``[B, Hkv, K]`` each. A key before ``lo`` belongs to the row's first document if it lies after that document's
    start; empty slots, keys of earlier documents and slots past the keys get document -1 (no query's)."""
    local = slots - lo
    inside = (local >= 0) & (local < pos.shape[1])
    at = local.clamp(0, pos.shape[1] - 1)
    k_pos = torch.where(inside, pos[:, at], pos[:, :1, None] + local)
    before = (local < 0) & (k_pos >= 0)
    k_id = torch.where(inside, ids[:, at], torch.where(before, ids[:, :1, None], -1))
    return k_id, k_pos


def _document_blocks(
    q_pos: Tensor, lo: int, base: int, L: int, L_pad: int, S: int, policies: Sequence[HeadPolicy], bank_pos: Tensor | None,
    N_pad: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(full, touched)`` ``[B, Hkv, Tq / BLOCK, (L_pad + N_pad) / BLOCK]`` from each query row's visible key intervals:
    live keys from its document's previous-segment start to itself, and per KV head the bank slots its policy reads
    (in-document history ranges, offset by where the document starts, found in the sorted bank positions)."""
    (B, Tq), Hkv = q_pos.shape, len(policies)
    rows = lo + torch.arange(Tq, device=q_pos.device)
    start = rows - q_pos  # absolute start of each row's document
    end = ((q_pos // S - 1) * S).clamp(min=0)
    live_t, live_f = _interval_blocks((start + end - base).clamp(0, L), (rows + 1 - base).clamp(max=L), L_pad // BLOCK)
    full, touched = [live_f[:, None].expand(-1, Hkv, -1, -1)], [live_t[:, None].expand(-1, Hkv, -1, -1)]
    if bank_pos is not None:
        hist_t = hist_f = None
        for a, b in _history_intervals(q_pos.flatten(), S, policies, carry_grad=True):  # [Hkv, B * Tq], in-document
            a, b = (torch.searchsorted(bank_pos, (x + start.flatten()).expand(Hkv, -1).contiguous()) for x in (a, b))
            t, f = _interval_blocks(*(x.view(Hkv, B, Tq).transpose(0, 1) for x in (a, b)), N_pad // BLOCK)
            hist_t, hist_f = (t, f) if hist_t is None else (hist_t | t, hist_f | f)
        full.append(hist_f)
        touched.append(hist_t)
    return torch.cat(full, -1), torch.cat(touched, -1)


def cp_document_block_mask(
    ids: Tensor, pos: Tensor, lo: int, base: int, segment_size: int, policies: Sequence[HeadPolicy], group: int,
    positions: Tensor | None, device,
) -> tuple[BlockMask, int, int]:  # fmt: skip
    """:func:`cp_block_mask` in document mode: ``ids, pos [B, hi - lo]`` are this rank's documents
    (:class:`~segtrain.attention.documents.Documents`); a query sees keys of its own document only, with segments
    and history at in-document positions. Padded query rows continue the last document (their output is dropped).
    The key lengths follow the split and a bucket of the history's length, not the layout (:func:`_bucket`)."""
    dev = torch.device(device)
    ids, pos = ids.to(dev), pos.to(dev)
    (B, T), S, G, Hkv = pos.shape, segment_size, group, len(policies)
    Tq, L, N = _ceil(T), T + lo - base, 0 if positions is None else positions.shape[1]
    # Key lengths that do not follow the layout: the carry is at most min(lo, 2S - 1) keys, and the bank's remote
    # part (N - L slots) is bucketed; the padding slots are never listed, so they cost memory only.
    L_pad = _ceil(T + min(lo, 2 * S - 1))
    N_pad = 0 if not N else _ceil(_bucket(N - L, S) + L_pad)
    q_id = torch.cat([ids, ids[:, -1:].expand(B, Tq - T)], 1)
    q_pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, Tq - T + 1, device=dev)], 1)
    slots = torch.full((Hkv, L_pad + N_pad), -1, dtype=torch.long)
    slots[:, :L] = torch.arange(base, base + L)
    if N:
        slots[:, L_pad : L_pad + N] = positions
    k_id, k_pos = _key_documents(ids, pos, lo, slots.to(dev))
    all_, sink, window = policy_tensors(policies, dev)

    def mask_mod(b, h, q_idx, kv_idx):
        kvh = h // G
        p, kp = q_pos[b, q_idx], k_pos[b, kvh, kv_idx]
        end = (p // S - 1) * S
        live = (kp >= end) & (kp <= p)
        hist = history_visible(all_[kvh], sink[kvh], window[kvh], kp, end)
        return (k_id[b, kvh, kv_idx] == q_id[b, q_idx]) & torch.where(kv_idx >= L_pad, hist, live)

    bank_pos = None if not N else slots[:, L_pad : L_pad + N].contiguous().to(dev)
    full, touched = _document_blocks(q_pos, lo, base, L, L_pad, S, policies, bank_pos, N_pad)
    full, touched = (m.repeat_interleave(G, dim=1).contiguous() for m in (full, touched))
    return block_lists(full, touched, mask_mod, (Tq, L_pad + N_pad)), L_pad, N_pad


def head_index(heads: Sequence[int]) -> slice | Tensor:
    """``heads`` as a slice when they are a contiguous increasing run (indexing gives a view), else an index tensor."""
    if len(heads) and list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[0] + len(heads))
    return torch.tensor(list(heads), dtype=torch.long)


def take_heads(t: Tensor, rows: slice | Tensor) -> Tensor:
    """``t[:, rows]`` (dim 1 holds heads)."""
    return t[:, rows] if isinstance(rows, slice) else t.index_select(1, rows.to(t.device))


def flex_cp_attention(q: Tensor, live: LiveKV, bank, share: RankShare, scale: float, offload=None, documents=None) -> Tensor:
    """``[B, Hq, hi - lo, D]``: attention of this rank's queries over ``[live | bank]`` keys in one FlexAttention call.

    One call needs one key length for every head, so heads outside ``bank.heads`` get empty (zero, masked)
    bank rows. Two calls (reading heads over ``[live | bank]``, the others over live keys) would drop those
    rows but cost a copy of the attention output to join the halves (the one-call output's transpose feeds
    ``o_proj`` as a view): tried, and on 2x H200 (1B shape, 64K tokens per GPU, 25% ``all``) memory after
    forward grew by 1.2 GiB at CP=1 and 1.6 GiB at CP=2; with offload those rows leave the GPU anyway.
    ``live``: the K/V read with gradient; ``bank``: the detached history (``context.HistoryBank``) or None; the block
    mask is cached per split (``share.key``), policies and device. ``documents``: document mode, this rank's
    :class:`~segtrain.attention.documents.Documents`; its mask is cached on it (one build per forward, every layer's).
    """
    k_ext, v_ext, base = live
    lo, hi, segment_size, policies = share.lo, share.hi, share.segment_size, share.policies
    Hkv = k_ext.shape[1]
    G = q.shape[1] // Hkv
    cache_key = (share.key, segment_size, tuple(policies), G, str(q.device))
    if documents is None:
        cache, build = _CACHE, partial(cp_block_mask, lo, hi, base)
    else:
        rows = documents.rows(q.shape[0])
        cache, cache_key = documents.cache, ("cp_flex", *cache_key)
        build = partial(cp_document_block_mask, rows.ids, rows.positions, lo, base)
    if cache_key not in cache:  # bank slot positions per KV head (-1: none), needed to build the mask only
        positions = None
        if bank is not None:
            positions = torch.full((Hkv, bank.positions.shape[1]), -1, dtype=bank.positions.dtype)
            positions[list(bank.heads)] = bank.positions
        cache[cache_key] = build(segment_size, policies, G, positions, q.device)
    mask, L_pad, N_pad = cache[cache_key]
    Tq = hi - lo
    qp = F.pad(q, (0, 0, 0, _ceil(Tq) - Tq))
    rows_k, rows_v, heads = (None, None, ()) if bank is None else (bank.k, bank.v, bank.heads)
    kk, vv = _keys(k_ext, rows_k, heads, L_pad, N_pad), _keys(v_ext, rows_v, heads, L_pad, N_pad)
    if offload is None:
        out = run_flex(qp, kk, vv, mask, scale, kernels=None)
    else:
        with offload.saving(kk, vv) as gid:  # the saved K/V (live and history) wait in CPU memory
            out = run_flex(qp, kk, vv, mask, scale, kernels=None)
        out = offload.attach(out, gid)
    return out[:, :, :Tq]


def _keys(live: Tensor, rows: Tensor | None, heads: Sequence[int], L_pad: int, N_pad: int) -> Tensor:
    """``[B, Hkv, L_pad + N_pad, D]``: the live K (or V), zero-padded, then the bank rows of the heads that have one."""
    if rows is None:
        return F.pad(live, (0, 0, 0, L_pad - live.shape[2]))
    if rows.shape[1] == live.shape[1]:  # every head reads history
        return torch.cat([F.pad(live, (0, 0, 0, L_pad - live.shape[2])), F.pad(rows, (0, 0, 0, N_pad - rows.shape[2]))], 2)
    B, H, L, D = live.shape
    out = live.new_zeros(B, H, L_pad + N_pad, D)
    out[:, :, :L] = live
    out[:, head_index(heads), L_pad : L_pad + rows.shape[2]] = rows
    return out
