"""Context parallelism by segments: each CP rank owns a contiguous run of whole segments (DESIGN.md §4).

Segment attention couples a segment only to the previous segment (with gradient) and to the history
its head's policy reads (detached). A sequence split on segment boundaries therefore needs just two
exchanges between ranks, after which every rank runs the ``math`` backend's loop on its own segments
with absolute positions, and gets exactly the single-device result for its tokens:

- **carry**: each rank sends the K/V of its last segment to the next rank, whose first segment reads
  it as its previous segment. That K/V has gradient, so backward sends its dK/dV back to the owner
  (:class:`_Carry`): gradient crosses a rank boundary exactly as it crosses a segment boundary.
- **history**: the keys before a rank's carried segment, only for KV heads whose policy reads them,
  only the keys read, forward only (history is detached). Rank ``r`` starting at token ``lo_r``
  needs, per head, ``policy.history_ranges(lo_r - S)``: what its first segment reads. Its later
  segments read no other remote key (sinks stay put; windows and ``all`` only move forward, onto keys
  the rank holds). Each owner sends its part of that point to point, once, so the bytes on the wire
  are exactly :func:`exchange_bytes` (``none`` heads: zero).

The received history and this rank's own detached K/V form one *bank* per call, with rows only for the
KV heads that read history. Like the ``math``
backend, each segment attends per run of adjacent heads that read the same keys
(:func:`segtrain.attention.segmented.head_runs`), over a slice of the bank when the keys are
contiguous there (``all`` heads: always), so nothing is padded and what autograd keeps of history is
the bank itself (linear in length), not a copy per segment. On CUDA (``backend="auto"``, segment
size a multiple of 128) the whole rank runs as one FlexAttention call over ``[live | bank]`` keys
instead (:mod:`segtrain.parallel.context_flex`), in document mode too (the documents go into its mask). With ``offload``
(:class:`segtrain.parallel.offload.HistoryOffload`) that bank waits in CPU memory until backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from segtrain.attention import Documents, check_qkv
from segtrain.attention.backends import context_parallel_form
from segtrain.attention.segmented import segment_loop
from segtrain.errors import UserError
from segtrain.parallel.context_flex import flex_cp_attention, head_index, take_heads
from segtrain.parallel.share import LiveKV, RankShare
from segtrain.policy import HeadPolicy, as_head_policies, history_end

__all__ = [
    "CPSplitError",
    "ExchangeBytes",
    "context_parallel_ranges",
    "context_parallel_segment_attention",
    "exchange_bytes",
    "shard_ranges",
]

Ranges = list[tuple[int, int]]


class CPSplitError(UserError):
    """A split of the sequence over context-parallel ranks that is not contiguous runs of whole segments."""


def context_parallel_ranges(seq_len: int, segment_size: int, world: int) -> Ranges:
    """Token range ``[lo, hi)`` of every rank in the balanced split: what a data loader should shard by.

    Every rank but the last gets ``ceil(n_segments / world)`` whole segments, the last the rest (its
    last segment may be partial). This is the smallest equal shard, so if it leaves a rank empty, no
    split into equal runs of whole segments exists.
    """
    for name, value in (("seq_len", seq_len), ("segment_size", segment_size), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CPSplitError(f"{name} must be an integer >= 1, got {value!r}")
    n_segments = math.ceil(seq_len / segment_size)
    local = math.ceil(n_segments / world) * segment_size
    if (world - 1) * local >= seq_len:
        raise CPSplitError(
            f"seq_len={seq_len} is {n_segments} segment(s) of segment_size={segment_size}: too few for context-parallel "
            f"size {world} (shards of {local} tokens leave rank {world - 1} empty); use a smaller CP size or a longer sequence"
        )
    return [(r * local, min(seq_len, (r + 1) * local)) for r in range(world)]


def shard_ranges(lengths: Sequence[int], segment_size: int) -> Ranges:
    """Token ranges of shards of the given lengths (rank order), after checking they split on segment boundaries.

    Every rank holds at least one token and every rank but the last a multiple of ``segment_size``,
    so each rank starts a segment and the carried segment is always whole. Shards need not be equal:
    an uneven split (more segments on early ranks) can balance ``all`` heads' history work.
    """
    ranges, lo = [], 0
    for r, n in enumerate(int(n) for n in lengths):
        if n < 1:
            raise CPSplitError(f"context-parallel rank {r} holds {n} tokens: every rank needs at least one token")
        if r < len(lengths) - 1 and n % segment_size:
            raise CPSplitError(
                f"context-parallel rank {r} holds {n} tokens, not a multiple of segment_size={segment_size}: "
                f"every rank but the last must hold whole segments"
            )
        ranges.append((lo, lo + n))
        lo += n
    if not ranges:
        raise CPSplitError("no context-parallel ranks: lengths is empty")
    return ranges


@dataclass
class ExchangeBytes:
    """Bytes one rank sends: ``carry`` and ``history`` in forward, ``carry_grad`` in backward."""

    carry: int = 0
    history: int = 0
    carry_grad: int = 0


def _history_needs(ranges: Ranges, segment_size: int, policies: Sequence[HeadPolicy]) -> list[list[Ranges]]:
    """``needs[r][h]``: keys of KV head ``h`` that rank ``r`` reads from before its carried segment."""
    return [[p.history_ranges(history_end(lo // segment_size, segment_size)) for p in policies] for lo, _ in ranges]


def _clip(ranges: Ranges, lo: int, hi: int) -> Ranges:
    return [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]


def exchange_bytes(
    ranges: Ranges,
    segment_size: int,
    policy: str | HeadPolicy | Sequence[str | HeadPolicy],
    *,
    batch: int,
    n_kv_heads: int,
    head_dim: int,
    v_head_dim: int | None = None,
    element_size: int,
) -> list[ExchangeBytes]:
    """Bytes each rank sends in one call (forward and backward), by formula.

    With ``e = batch * (head_dim + v_head_dim) * element_size`` (one key's K and V in one KV head),
    ``S = segment_size`` and rank ``r`` holding ``[lo_r, hi_r)`` of ``W`` ranks:

    - ``carry[r] = e * n_kv_heads * S`` for ``r < W - 1`` (the last segment, always whole), else 0;
    - ``carry_grad[r] = e * n_kv_heads * S`` for ``r > 0`` (the received segment's dK/dV), else 0;
    - ``history[q] = e * sum over r > q, heads h of |policy_h.history_ranges(lo_r - S) ∩ [lo_q, hi_q)|``.
      Summed over senders, rank ``r`` receives ``e * sum_h policy_h.history_count(lo_r - S)``:
      ``all`` ``lo_r - S`` keys, ``sink:N`` ``min(N, lo_r - S)``, ``window:W`` ``min(W, lo_r - S)``,
      ``sink:N+window:W`` ``min(lo_r - S, N + W)``, ``none`` nothing.
    """
    policies = as_head_policies(policy, n_kv_heads)
    e = batch * (head_dim + (head_dim if v_head_dim is None else v_head_dim)) * element_size
    carry = e * n_kv_heads * segment_size
    W, needs = len(ranges), _history_needs(ranges, segment_size, policies)
    out = []
    for q, (lo, hi) in enumerate(ranges):
        keys = sum(b - a for r in range(q + 1, W) for need in needs[r] for a, b in _clip(need, lo, hi))
        out.append(ExchangeBytes(carry=carry if q < W - 1 else 0, history=e * keys, carry_grad=carry if q > 0 else 0))
    return out


def _pack(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous 1-D buffer (what gloo and NCCL send), one message per peer."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buffer: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(buffer.split(sizes), shapes)]


def _p2p(group, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> None:
    """Post every send and receive at once (no ordering deadlock), then wait. Peers are ranks in ``group``."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for p, t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _Carry(torch.autograd.Function):
    """Forward: this rank's last-segment K/V to the next rank; returns the previous rank's (empty on rank 0).

    Backward: the gradient of the received K/V goes back to its owner, which returns it as the gradient
    of its last segment, so autograd adds it to that rank's dK/dV. Every rank must run this node in
    backward (rank 0's empty output is concatenated into its local KV for that reason).
    """

    @staticmethod
    def forward(ctx, k_last: Tensor, v_last: Tensor, group, rank: int, world: int, segment_size: int, stats):
        B, H, _, D = k_last.shape
        shapes = [(B, H, segment_size, D), (B, H, segment_size, v_last.shape[-1])]
        ctx.group, ctx.rank, ctx.world, ctx.stats, ctx.shapes = group, rank, world, stats, shapes
        sends = [(rank + 1, _pack([k_last, v_last]))] if rank < world - 1 else []
        recv = k_last.new_empty(sum(math.prod(s) for s in shapes)) if rank > 0 else None
        _p2p(group, sends, [(rank - 1, recv)] if recv is not None else [])
        if stats is not None:
            stats.carry += sum(t.nbytes for _, t in sends)
        if recv is None:
            return k_last.new_empty(B, H, 0, D), v_last.new_empty(B, H, 0, v_last.shape[-1])
        return tuple(_unpack(recv, shapes))

    @staticmethod
    def backward(ctx, dk_prev: Tensor, dv_prev: Tensor):
        rank, world = ctx.rank, ctx.world
        sends = [(rank - 1, _pack([dk_prev, dv_prev]))] if rank > 0 else []
        recv = dk_prev.new_empty(sum(math.prod(s) for s in ctx.shapes)) if rank < world - 1 else None
        _p2p(ctx.group, sends, [(rank + 1, recv)] if recv is not None else [])
        if ctx.stats is not None:
            ctx.stats.carry_grad += sum(t.nbytes for _, t in sends)
        if recv is None:
            return (None,) * 7
        return (*_unpack(recv, ctx.shapes), None, None, None, None, None)


class HistoryBank(NamedTuple):
    """Detached K/V that every history read of this rank gathers from, for the KV heads that read history only.

    ``k, v [B, len(heads), R + L, D]`` and ``positions [len(heads), R + L]`` (CPU, sorted per row): row ``i``
    belongs to KV head ``heads[i]``. Slots ``[R - n_h, R)`` of a row hold the ``n_h`` remote keys its head
    reads (``-1`` pads the rest of the first ``R``); slots ``R + i`` hold the carried and own keys at ``base + i``.
    """

    k: Tensor
    v: Tensor
    positions: Tensor
    heads: tuple[int, ...]


def _history_bank(k: Tensor, v: Tensor, live: LiveKV, share: RankShare, needs: list[list[Ranges]] | None = None) -> HistoryBank:
    """Exchange the history this rank and later ranks read, and build this rank's :class:`HistoryBank`.

    ``none`` heads get no row: a bank row also repeats the rank's own keys (detached), so a row per KV head
    would cost a second copy of the live K/V for heads that never read it. ``needs``: what each rank reads from
    earlier ranks (default: one stream's, :func:`_history_needs`; document mode: :func:`_document_plan`'s).
    """
    B, _, _, D = k.shape
    ranges, rank, policies = share.ranges, share.rank, share.policies
    heads = tuple(h for h, p in enumerate(policies) if p.reads_history)
    lo, hi = share.lo, share.hi
    needs = _history_needs(ranges, share.segment_size, policies) if needs is None else needs
    sends = []
    for r in range(rank + 1, len(ranges)):  # later ranks read what we own
        parts = [(h, a, b) for h in heads for a, b in _clip(needs[r][h], lo, hi)]
        if parts:
            pieces = [k[:, h, a - lo : b - lo] for h, a, b in parts] + [v[:, h, a - lo : b - lo] for h, a, b in parts]
            sends.append((r, _pack([t.detach() for t in pieces])))
    mine = [needs[rank][h] for h in heads]
    counts = [sum(b - a for a, b in need) for need in mine]
    R = max(counts, default=0)
    remote_k, remote_v = k.new_zeros(B, len(heads), R, D), v.new_zeros(B, len(heads), R, v.shape[-1])
    recvs = []
    for q in range(rank):  # we read what earlier ranks own
        parts = [(i, a, b) for i in range(len(heads)) for a, b in _clip(mine[i], *ranges[q])]
        if parts:
            shapes = [(B, b - a, D) for _, a, b in parts] + [(B, b - a, v.shape[-1]) for _, a, b in parts]
            recvs.append((q, k.new_empty(sum(math.prod(s) for s in shapes)), parts, shapes))
    _p2p(share.group, sends, [(q, buf) for q, buf, _, _ in recvs])
    if share.stats is not None:
        share.stats.history += sum(t.nbytes for _, t in sends)
    for _, buf, parts, shapes in recvs:
        tensors = _unpack(buf, shapes)
        for (i, a, b), tk, tv in zip(parts, tensors[: len(parts)], tensors[len(parts) :]):
            slot = R - counts[i] + sum(max(0, min(y, a) - x) for x, y in mine[i])  # keys of row i before a
            remote_k[:, i, slot : slot + b - a], remote_v[:, i, slot : slot + b - a] = tk, tv
    own = torch.arange(live.base, hi)
    positions = torch.stack(
        [torch.cat([torch.full((R - counts[i],), -1), *(torch.arange(a, b) for a, b in mine[i]), own]) for i in range(len(heads))]
    )
    rows = head_index(heads)
    bank_k = torch.cat([remote_k, take_heads(live.k, rows).detach()], 2)
    bank_v = torch.cat([remote_v, take_heads(live.v, rows).detach()], 2)
    return HistoryBank(bank_k, bank_v, positions, heads)  # positions stay on the CPU: slot arithmetic without syncs


def _history_slices(bank: HistoryBank, h0: int, h1: int, ranges: Ranges):
    """Bank K/V of KV heads ``[h0, h1)`` (all of which read history) at the history ``ranges`` they all read: a slice
    (a view) when the slots are contiguous and equal for every head of the run, else a gather. ``[B, h1 - h0, Lh, D]``."""
    r0 = bank.heads.index(h0)  # reading heads are increasing, so a run of them is a run of rows
    r1 = r0 + h1 - h0
    wanted = torch.cat([torch.arange(a, b) for a, b in ranges])
    index = torch.searchsorted(bank.positions[r0:r1], wanted.expand(r1 - r0, -1).contiguous())  # [run, Lh], CPU
    first = index[0, 0].item()
    if (index == torch.arange(first, first + len(wanted))).all():
        return bank.k[:, r0:r1, first : first + len(wanted)], bank.v[:, r0:r1, first : first + len(wanted)]
    rows = torch.arange(r0, r1)[:, None].to(bank.k.device)
    index = index.to(bank.k.device)
    return bank.k[:, rows, index], bank.v[:, rows, index]


# ---- document mode (DESIGN.md §1 "Documents") ------------------------------------------------------------------------


def _first_positions(documents: Documents, group, world: int, device) -> list[list[int]]:
    """``[rank][row]``: the in-document position of each rank's first token (0: a document starts there). One
    all_gather per forward; every layer reuses it."""
    key = ("cp_first_positions", id(group))
    if key not in documents.cache:
        mine = documents.positions[:, 0].contiguous().to(device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        documents.cache[key] = [t.tolist() for t in every]
    return documents.cache[key]


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class DocumentPlan:
    """What each rank reads from earlier ranks in document mode, from the first positions of every rank's rows.

    A row whose first token continues a document that began at ``d = lo - p0`` reads, with gradient, the keys of
    its document from the start of its previous segment, ``d + history_end(p0 // S)``: up to ``2S - 1`` keys before
    ``lo`` (documents' segments are not the stream's), held by one or more earlier ranks. ``carry[r]`` is the most
    over rows; the rows read the history their policy gives before that, detached (``needs[r][h]``, merged over rows,
    absolute positions, clipped below the carried keys). A rank whose rows all start a document receives nothing.
    """

    carry: tuple[int, ...]
    needs: list[list[Ranges]]


def _document_plan(ranges: Ranges, segment_size: int, policies: Sequence[HeadPolicy], first: list[list[int]]) -> DocumentPlan:
    S, carry, needs = segment_size, [], []
    for (lo, _), firsts in zip(ranges, first):
        c, per_head = 0, [[] for _ in policies]
        for p0 in firsts:
            if p0 == 0:
                continue
            live = history_end(p0 // S, S)  # in-document start of the first token's previous segment
            c, d = max(c, p0 - live), lo - p0
            for h, p in enumerate(policies):
                per_head[h] += [(d + a, d + b) for a, b in p.history_ranges(live)]
        carry.append(c)
        needs.append([_merge(_clip(rs, 0, lo - c)) for rs in per_head])
    return DocumentPlan(tuple(carry), needs)


class _Live(torch.autograd.Function):
    """Document mode's carry: rank ``r`` receives the ``carry[r]`` keys before its first token (K and V, with
    gradient) from whichever earlier ranks own them; backward returns their gradient to the owners, which add it to
    their dK/dV. Every rank runs this node in both directions (an empty output still joins the rank's live K/V)."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, group, rank: int, ranges: tuple, carry: tuple, stats):
        lo, hi = ranges[rank]
        B, H, _, D = k.shape
        Dv = v.shape[-1]
        sends = [(r, max(a - c, lo), min(a, hi)) for r, ((a, _), c) in enumerate(zip(ranges, carry)) if r > rank]
        sends = [(r, a, b) for r, a, b in sends if a < b]
        recvs = [(q, max(lo - carry[rank], a), min(lo, b)) for q, (a, b) in enumerate(ranges[:rank])]
        recvs = [(q, a, b) for q, a, b in recvs if a < b]
        ctx.group, ctx.rank, ctx.stats, ctx.sends, ctx.recvs = group, rank, stats, sends, recvs
        ctx.shape, ctx.Dv, ctx.lo = (B, H, k.shape[2], D), Dv, lo
        out = [(r, _pack([k[:, :, a - lo : b - lo], v[:, :, a - lo : b - lo]])) for r, a, b in sends]
        bufs = [(q, k.new_empty(B * H * (b - a) * (D + Dv))) for q, a, b in recvs]
        _p2p(group, out, bufs)
        if stats is not None:
            stats.carry += sum(t.nbytes for _, t in out)
        parts = [_unpack(buf, [(B, H, b - a, D), (B, H, b - a, Dv)]) for (_, buf), (_, a, b) in zip(bufs, recvs)]
        if not parts:
            return k.new_empty(B, H, 0, D), v.new_empty(B, H, 0, Dv)
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)

    @staticmethod
    def backward(ctx, dk_prev: Tensor, dv_prev: Tensor):
        (B, H, n, D), Dv, lo = ctx.shape, ctx.Dv, ctx.lo
        out, at = [], 0
        for q, a, b in ctx.recvs:
            out.append((q, _pack([dk_prev[:, :, at : at + b - a], dv_prev[:, :, at : at + b - a]])))
            at += b - a
        bufs = [(r, dk_prev.new_empty(B * H * (b - a) * (D + Dv))) for r, a, b in ctx.sends]
        _p2p(ctx.group, out, bufs)
        if ctx.stats is not None:
            ctx.stats.carry_grad += sum(t.nbytes for _, t in out)
        dk, dv = dk_prev.new_zeros(B, H, n, D), dv_prev.new_zeros(B, H, n, Dv)
        for (_, buf), (_, a, b) in zip(bufs, ctx.sends):
            gk, gv = _unpack(buf, [(B, H, b - a, D), (B, H, b - a, Dv)])
            dk[:, :, a - lo : b - lo] += gk
            dv[:, :, a - lo : b - lo] += gv
        return dk, dv, None, None, None, None, None


def _row_bank(bank: HistoryBank | None, row: int) -> HistoryBank | None:
    return None if bank is None else HistoryBank(bank.k[row : row + 1], bank.v[row : row + 1], bank.positions, bank.heads)


def _document_attention(
    q: Tensor, k: Tensor, v: Tensor, documents: Documents, share: RankShare, scale: float, offload, form: str
) -> Tensor:
    """This rank's share of document-mode segment attention over its live keys (carried and own) and its history (the
    bank's slots of its document): one FlexAttention call with the documents in the mask (``form == "flex"``), or
    the segment loop per document piece of every row, at its own positions."""
    ranges, S, policies, lo = share.ranges, share.segment_size, share.policies, share.lo
    key = ("cp_plan", share.key, S, policies, id(share.group))
    if key not in documents.cache:
        first = _first_positions(documents, share.group, len(ranges), q.device)
        documents.cache[key] = _document_plan(list(ranges), S, policies, first)
    plan = documents.cache[key]
    k_prev, v_prev = _Live.apply(k, v, share.group, share.rank, ranges, plan.carry, share.stats)
    live = LiveKV(torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2), lo - k_prev.shape[2])
    bank = None
    if any(p.reads_history for p in policies):
        bank = _history_bank(k, v, live, share, needs=plan.needs)
    if form == "flex":
        return flex_cp_attention(q, live, bank, share, scale, offload, documents=documents)
    saving = contextlib.nullcontext(None) if offload is None or bank is None else offload.saving(bank.k, bank.v)
    rows = []
    with saving as offload_group:
        for b, spans in enumerate(documents.rows(q.shape[0]).spans):
            row_bank, parts = _row_bank(bank, b), []
            for a, e in spans:
                p0 = int(documents.positions[b, a])
                d = lo + a - p0  # where the document starts (absolute)
                first = history_end(p0 // S, S)  # its first live key, in-document

                def history(h0, h1, hist, d=d, row_bank=row_bank):
                    return _history_slices(row_bank, h0, h1, [(d + x, d + y) for x, y in hist])

                kd, vd = (t[b : b + 1, :, d + first - live.base : lo + e - live.base] for t in (live.k, live.v))
                parts.append(segment_loop(q[b : b + 1, :, a:e], kd, vd, S, policies, scale, history, q_start=p0, kv_start=first))
            rows.append(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
        out = torch.cat(rows, 0) if len(rows) > 1 else rows[0]
    return out if offload_group is None else offload.attach(out, offload_group)


def _gather_ranges(n_local: int, segment_size: int, group, world: int, device) -> Ranges:
    """Every rank's range from the shard lengths (one all_gather); every rank raises the same error on a bad split."""
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
    return shard_ranges(torch.cat(lengths).tolist(), segment_size)


def context_parallel_segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_size: int,
    policy: str | HeadPolicy | Sequence[str | HeadPolicy],
    group: dist.ProcessGroup | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    scale: float | None = None,
    stats: ExchangeBytes | None = None,
    offload=None,
    backend: str = "math",
    documents: Documents | None = None,
) -> Tensor:
    """``segment_attention`` over a sequence split across the context-parallel ``group``; returns this rank's part.

    Every rank of ``group`` must call this together (it communicates), with the same arguments but
    its own shard.

    Args:
        q: ``[B, Hq, T_local, D]``; k, v: ``[B, Hkv, T_local, D]``: this rank's tokens, a contiguous
            run of whole segments (the last rank's may end in a partial segment). Rank ``r`` of
            ``group`` holds the ``r``-th run.
        segment_size, policy, scale: as in :func:`segtrain.attention.segment_attention`.
        group: the CP process group (default: the world). With NCCL, tensors live on this rank's GPU.
        ranges: every rank's token range ``[lo, hi)`` (e.g. :func:`context_parallel_ranges`), the same
            list on every rank. None: gather the shard lengths (one small all_gather, which also
            makes every rank raise the same error on a bad split instead of hanging).
        stats: if given, the bytes this rank sends are added to it (``carry_grad`` during backward).
        offload: a :class:`segtrain.parallel.offload.HistoryOffload`: the history bank autograd saves
            waits in CPU memory between forward and backward.
        backend: an attention backend name; the registry's context-parallel form of it runs
            (:func:`segtrain.attention.backends.context_parallel_form`): the segment loop (any device), or
            one FlexAttention call over ``[live | bank]`` keys (:mod:`segtrain.parallel.context_flex`; CUDA,
            segment size a multiple of 128).
        documents: document mode: this rank's shard of the packed documents (its first document may continue one
            begun on an earlier rank). The flex form puts the documents into its mask (one call per rank); the segment
            loop runs per document.

    Returns:
        ``[B, Hq, T_local, Dv]``: the single-device ``segment_attention`` output at this rank's
        tokens, with the same gradients into this rank's q, k and v.
    """
    check_qkv(q, k, v, segment_size)
    form = context_parallel_form(backend, q, segment_size)
    S = segment_size
    policies = tuple(as_head_policies(policy, k.shape[1]))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if ranges is None:
        ranges = _gather_ranges(q.shape[2], S, group, world, q.device)
    else:
        ranges = [(int(a), int(b)) for a, b in ranges]
        if len(ranges) != world or shard_ranges([b - a for a, b in ranges], S) != ranges:
            raise CPSplitError(f"ranges {ranges} are not {world} contiguous runs of whole segments from token 0, one per CP rank")
    lo, hi = ranges[rank]
    if q.shape[2] != hi - lo:
        raise CPSplitError(f"context-parallel rank {rank} holds {q.shape[2]} tokens but its range is [{lo}, {hi})")

    share = RankShare(tuple(ranges), rank, S, policies, group, stats)
    if documents is not None:
        if documents.length != q.shape[2]:
            raise ValueError(f"documents cover {documents.length} tokens, this rank holds {q.shape[2]}")
        return _document_attention(q, k, v, documents, share, scale, offload, form)
    live = LiveKV(k, v, lo)  # K/V at positions [base, hi): carried segment + own
    if world > 1:
        last = slice(max(0, q.shape[2] - S), None)
        k_prev, v_prev = _Carry.apply(k[:, :, last], v[:, :, last], group, rank, world, S, stats)
        live = LiveKV(torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2), lo - k_prev.shape[2])
    bank = None
    if any(p.reads_history for p in policies):
        bank = _history_bank(k, v, live, share)
    if form == "flex":
        return flex_cp_attention(q, live, bank, share, scale, offload)
    saving = contextlib.nullcontext(None) if offload is None or bank is None else offload.saving(bank.k, bank.v)
    with saving as offload_group:
        out = segment_loop(q, live.k, live.v, S, policies, scale, partial(_history_slices, bank), q_start=lo, kv_start=live.base)
    return out if offload_group is None else offload.attach(out, offload_group)
