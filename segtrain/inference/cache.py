"""KV cache per (layer, KV head) that holds exactly what each head's policy can still read (DESIGN.md §1).

While a row's queries are in segment ``s``, a KV head keeps the history its policy reads
(``HeadPolicy.retained_ranges``: all, sink, window) plus everything from the previous segment on;
nothing else. KV heads with the same policy share one buffer per layer, so a ``none`` head really
holds at most two segments, and its buffer is allocated at that size (``policy_capacity``).

Each row keeps its keys compacted and in position order: slots ``[0, count)`` hold the retained
positions (bookkeeping in :class:`_Slots`, shared by all layers since it depends on the policy
only). When a row enters a new segment, keys its policy no longer reads are dropped and the rest
slide left. Because the cache holds exactly the keys visible to the block's queries (plus the
block's own future keys), attention is one causal-by-position :func:`segment_block_attention`
call over the buffer, or, for a multi-token block (prefill), one SDPA call with a lower-right
causal mask over ``[history, previous segment, current segment]`` (:func:`lower_right_sdpa`).

``offload_history``: the history of ``all`` heads (keys before the previous segment) moves to
(pinned) CPU memory and is streamed back one layer at a time, prefetched on a side stream on CUDA;
the GPU keeps two segments per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from segtrain.attention import segment_block_attention
from segtrain.policy import HeadPolicy, PolicyTable, history_end

__all__ = ["Block", "SegmentKVCache", "lower_right_sdpa", "policy_capacity"]


def policy_capacity(policy: HeadPolicy, segment_size: int, max_length: int, offload: bool = False) -> int:
    """Most keys one row of a head with ``policy`` ever holds (on the device) for sequences up to ``max_length``."""
    if policy.all and not offload:
        return max_length
    return min(max_length, policy.sink + policy.window + 2 * segment_size)


@dataclass(frozen=True)
class Block:
    """One step's new tokens: row ``b`` brings positions ``[starts[b], starts[b] + counts[b])``, all in one segment.

    Rows with fewer tokens than ``width`` are padded at the end; a row with count 0 sits the step out
    (its cache does not change).
    """

    starts: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.counts)

    @property
    def uniform(self) -> bool:
        return len(set(self.starts)) == 1 and all(c == self.width for c in self.counts)

    def positions(self, device) -> Tensor:
        """``[B, width]`` absolute positions, ``-1`` on padding."""
        offs = torch.arange(self.width, device=device)
        starts = torch.tensor(self.starts, device=device)[:, None]
        counts = torch.tensor(self.counts, device=device)[:, None]
        return torch.where(offs < counts, starts + offs, -1)


def lower_right_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Segment attention of a block of queries over keys laid out ``[history, previous segment, current segment]``.

    ``q [B, Hq, n, D]`` are the queries of the last ``n`` keys of ``k, v [B, Hkv, L, D]``. Every
    history key is visible to every query of the segment, so the segment rule is plain causal
    attention aligned at the lower right. GQA without expanding K/V: the flash kernel reads each KV
    head for its query group (an expanded copy of a 128K history costs 512 MiB per layer at 8B).
    """
    n, L = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(n, L), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _as_index(heads: list[int], device) -> slice | Tensor:
    """Contiguous heads index as a slice (a view, no copy)."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return torch.tensor(heads, device=device)


class _Slots:
    """Which positions one policy's buffers hold, row by row, in slot order. The same for every layer."""

    def __init__(self, policy: HeadPolicy, batch: int, capacity: int, segment_size: int, offload: bool, device):
        self.policy, self.capacity, self.segment_size, self.offload = policy, capacity, segment_size, offload
        self.held: list[list[tuple[int, int]]] = [[] for _ in range(batch)]  # [lo, hi) position ranges
        self.segment = [-1] * batch
        self.offloaded = [0] * batch  # offload: positions [0, offloaded[b]) live in host memory
        self.pos = torch.full((batch, capacity), -1, dtype=torch.int64, device=device)

    def count(self, row: int) -> int:
        return sum(hi - lo for lo, hi in self.held[row])

    def retained(self, segment: int) -> list[tuple[int, int | None]]:
        if self.offload:
            return [(history_end(segment, self.segment_size), None)]
        return self.policy.retained_ranges(segment, self.segment_size)

    def enter(self, row: int, segment: int):
        """Row ``row`` moves to ``segment``: returns slot moves ``(src, dst, n)`` and host copies ``(src, lo, hi)``."""
        self.segment[row] = segment
        kept, moves, to_host, slot = [], [], [], 0
        end = history_end(segment, self.segment_size)
        for lo, hi in self.held[row]:
            if self.offload and lo < end:  # history of an offloaded 'all' head: to host memory
                to_host.append((slot, lo, min(hi, end)))
            for r_lo, r_hi in self.retained(segment):
                a, b = max(lo, r_lo), hi if r_hi is None else min(hi, r_hi)
                if a < b:
                    moves.append((slot + a - lo, sum(k_hi - k_lo for k_lo, k_hi in kept), b - a))
                    kept.append((a, b))
            slot += hi - lo
        if self.offload:
            self.offloaded[row] = max(self.offloaded[row], end)
        self.held[row] = _merge(kept)
        count = self.count(row)
        self.pos[row].fill_(-1)
        if count:
            self.pos[row, :count] = torch.cat([torch.arange(lo, hi) for lo, hi in self.held[row]]).to(self.pos.device)
        return [m for m in moves if m[0] != m[1]], to_host

    def append(self, row: int, start: int, n: int) -> int:
        """Reserve slots for positions ``[start, start + n)``; returns the first slot."""
        slot = self.count(row)
        if slot + n > self.capacity:
            raise RuntimeError(
                f"KV cache for policy {self.policy} is full ({self.capacity} slots): the cache was made for a shorter max_length"
            )
        self.held[row] = _merge(self.held[row] + [(start, start + n)])
        self.pos[row, slot : slot + n] = torch.arange(start, start + n, device=self.pos.device)
        return slot


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@dataclass
class _Group:
    """One layer's KV heads that share a policy, and their buffers ``[B, heads, slots, D]``."""

    policy: HeadPolicy
    kv_heads: slice | Tensor
    q_heads: slice | Tensor
    k: Tensor
    v: Tensor
    host_k: Tensor | None = None
    host_v: Tensor | None = None


class SegmentKVCache:
    """Per-(layer, KV head) KV cache of a batch of sequences, sized by each head's policy.

    Use: ``begin_block(block)`` once per step (drops what rows entering a new segment no longer
    read, reserves slots), then ``attend(layer, q, k, v)`` per layer (stores the block's K/V,
    returns the attention output).
    """

    def __init__(
        self,
        policies: PolicyTable,
        *,
        batch_size: int,
        max_length: int,
        segment_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        offload_history: bool = False,
        sdpa_prefill: bool = False,
    ):
        self.policies, self.segment_size, self.max_length = policies, segment_size, max_length
        self.batch_size, self.device, self.sdpa_prefill = batch_size, torch.device(device), sdpa_prefill
        self.offload_history = offload_history
        group = num_heads // policies.n_kv_heads
        pin = self.device.type == "cuda"
        self.slots: dict[HeadPolicy, _Slots] = {}
        self.layers: list[list[_Group]] = []
        for row in policies.layers:
            groups = []
            for policy in dict.fromkeys(row):  # distinct policies, in head order
                heads = [h for h, p in enumerate(row) if p == policy]
                offload = offload_history and policy.all
                cap = policy_capacity(policy, segment_size, max_length, offload)
                if policy not in self.slots:
                    self.slots[policy] = _Slots(policy, batch_size, cap, segment_size, offload, self.device)
                shape = (batch_size, len(heads), cap, head_dim)
                g = _Group(
                    policy,
                    _as_index(heads, self.device),
                    _as_index([h * group + i for h in heads for i in range(group)], self.device),
                    torch.zeros(shape, dtype=dtype, device=self.device),
                    torch.zeros(shape, dtype=dtype, device=self.device),
                )
                if offload:  # position-major, so that a row's history [0, end) is one contiguous block
                    host = (batch_size, max_length, len(heads), head_dim)
                    g.host_k, g.host_v = (torch.zeros(host, dtype=dtype, pin_memory=pin) for _ in range(2))
                groups.append(g)
            self.layers.append(groups)
        self._block: Block | None = None
        self._q_positions: Tensor | None = None
        self._first_slot: dict[HeadPolicy, list[int]] = {}
        self._staged: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}
        self._stream = torch.cuda.Stream(self.device) if offload_history and pin else None

    # -- bookkeeping ---------------------------------------------------------------------------

    def begin_block(self, block: Block) -> None:
        """Prepare for a step's new tokens: evict for rows entering a new segment, reserve their slots."""
        if len(block.counts) != self.batch_size:
            raise ValueError(f"block has {len(block.counts)} rows, the cache {self.batch_size}")
        S = self.segment_size
        for row, (start, n) in enumerate(zip(block.starts, block.counts)):
            if n and start // S != (start + n - 1) // S:
                raise ValueError(f"row {row}: block [{start}, {start + n}) crosses a segment boundary (segment_size={S})")
            if n and start + n > self.max_length:
                raise RuntimeError(f"row {row}: position {start + n - 1} is beyond the cache's max_length={self.max_length}")
        self._staged.clear()
        self._first_slot = {}
        for policy, slots in self.slots.items():
            first = []
            for row, (start, n) in enumerate(zip(block.starts, block.counts)):
                if n and start // S != slots.segment[row]:
                    moves, to_host = slots.enter(row, start // S)
                    self._relocate(policy, row, moves, to_host)
                first.append(slots.append(row, start, n) if n else slots.count(row))
            self._first_slot[policy] = first
        self._block = block
        self._q_positions = block.positions(self.device)
        self.prefetch(0)

    def _relocate(self, policy: HeadPolicy, row: int, moves, to_host) -> None:
        """Apply one row's eviction to every layer's buffers of ``policy``."""
        for groups in self.layers:
            for g in groups:
                if g.policy != policy:
                    continue
                for src, lo, hi in to_host:
                    g.host_k[row, lo:hi].copy_(g.k[row, :, src : src + hi - lo].transpose(0, 1))
                    g.host_v[row, lo:hi].copy_(g.v[row, :, src : src + hi - lo].transpose(0, 1))
                for src, dst, n in moves:  # dst < src and moves go left to right: clone guards the overlap
                    g.k[row, :, dst : dst + n] = g.k[row, :, src : src + n].clone()
                    g.v[row, :, dst : dst + n] = g.v[row, :, src : src + n].clone()

    # -- offloaded history ---------------------------------------------------------------------

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer``'s offloaded history to the device (side stream on CUDA)."""
        if not self.offload_history or layer >= len(self.layers) or layer in self._staged:
            return
        staged = {}
        for i, g in enumerate(self.layers[layer]):
            if g.host_k is None:
                continue
            end = max(self.slots[g.policy].offloaded)
            if end == 0:
                continue
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    kv = tuple(t[:, :end].to(self.device, non_blocking=True) for t in (g.host_k, g.host_v))
            else:
                kv = tuple(t[:, :end].to(self.device) for t in (g.host_k, g.host_v))
            staged[i] = tuple(t.transpose(1, 2) for t in kv)  # [B, heads, end, D]
        self._staged[layer] = staged

    def _history(self, layer: int, index: int) -> tuple[Tensor, Tensor] | None:
        self.prefetch(layer)
        kv = self._staged[layer].pop(index, None)
        if kv is not None and self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for t in kv:
                t.record_stream(current)
        return kv

    # -- attention -----------------------------------------------------------------------------

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the block's ``k, v [B, Hkv, n, D]`` for ``layer`` and attend ``q [B, Hq, n, D]``; returns ``[B, Hq, n, D]``."""
        block = self._block
        if block is None or q.shape[2] != block.width:
            raise RuntimeError("call begin_block(block) before attend, with k/v of the block's width")
        outs = []
        for i, g in enumerate(self.layers[layer]):
            first = self._first_slot[g.policy]
            self._store(g, k[:, g.kv_heads], v[:, g.kv_heads], first, block)
            history = self._history(layer, i) if g.host_k is not None else None
            outs.append((g.q_heads, self._attend_group(g, q[:, g.q_heads], first, history, block)))
        self._staged.pop(layer, None)
        if len(outs) == 1:
            return outs[0][1]
        out = torch.empty_like(q)
        for heads, o in outs:
            out[:, heads] = o
        return out

    def _store(self, g: _Group, k: Tensor, v: Tensor, first: list[int], block: Block) -> None:
        if block.uniform and len(set(first)) == 1:
            a, n = first[0], block.width
            g.k[:, :, a : a + n], g.v[:, :, a : a + n] = k, v
            return
        for row, n in enumerate(block.counts):
            if n:
                a = first[row]
                g.k[row, :, a : a + n], g.v[row, :, a : a + n] = k[row, :, :n], v[row, :, :n]

    def _attend_group(self, g: _Group, q: Tensor, first: list[int], history, block: Block) -> Tensor:
        slots = self.slots[g.policy]
        counts = [f + n for f, n in zip(first, block.counts)]
        length = max(counts)
        if self.sdpa_prefill and block.width > 1:
            return self._sdpa_group(g, q, counts, history, block)
        k_hist = v_hist = valid = None
        if history is not None:
            k_hist, v_hist = history
            ends = torch.tensor(slots.offloaded, device=q.device)
            valid = (torch.arange(k_hist.shape[2], device=q.device) < ends[:, None])[:, None].expand(-1, k_hist.shape[1], -1)
        out, _ = segment_block_attention(
            q,
            g.k[:, :, :length],
            g.v[:, :, :length],
            k_hist,
            v_hist,
            q_positions=self._q_positions,
            local_positions=slots.pos[:, :length],
            history_valid=valid,
        )
        return out

    def _sdpa_group(self, g: _Group, q: Tensor, counts: list[int], history, block: Block) -> Tensor:
        slots = self.slots[g.policy]

        def keys(rows: slice, count: int, end: int):
            k, v = g.k[rows, :, :count], g.v[rows, :, :count]
            if history is not None and end:
                k, v = torch.cat([history[0][rows, :, :end], k], 2), torch.cat([history[1][rows, :, :end], v], 2)
            return k, v

        if block.uniform and len(set(counts)) == 1 and len(set(slots.offloaded)) == 1:
            return lower_right_sdpa(q, *keys(slice(None), counts[0], slots.offloaded[0]))
        out = torch.zeros_like(q)
        for row, n in enumerate(block.counts):
            if n:
                rows = slice(row, row + 1)
                out[rows, :, :n] = lower_right_sdpa(q[rows, :, :n], *keys(rows, counts[row], slots.offloaded[row]))
        return out

    # -- inspection ----------------------------------------------------------------------------

    def held_positions(self, layer: int, kv_head: int, row: int) -> list[int]:
        """Positions whose K/V the cache holds for (layer, KV head, row), offloaded history included."""
        slots = self.slots[self.policies[layer][kv_head]]
        held = list(range(slots.offloaded[row])) if slots.offload else []
        return held + [j for lo, hi in slots.held[row] for j in range(lo, hi)]

    def capacity(self, layer: int, kv_head: int) -> int:
        """Device slots per row allocated for (layer, KV head)."""
        return self.slots[self.policies[layer][kv_head]].capacity

    def memory_bytes(self) -> int:
        """Bytes of device memory the cache holds (K/V buffers and slot positions)."""
        kv = sum(t.nbytes for groups in self.layers for g in groups for t in (g.k, g.v))
        return kv + sum(s.pos.nbytes for s in self.slots.values())

    def offloaded_bytes(self) -> int:
        """Bytes of host memory holding offloaded history."""
        return sum(t.nbytes for groups in self.layers for g in groups for t in (g.host_k, g.host_v) if t is not None)
