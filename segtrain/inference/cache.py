"""Static KV cache per (layer, KV head) that holds what each head's policy can still read (DESIGN.md §1).

Every buffer is allocated once, at its final size, and a key's slot is a function of its position
only (:class:`HeadLayout`), so storing a step's K/V and finding what a query sees are device
operations with fixed shapes: no host bookkeeping per token, and a decoding step can be captured as
a CUDA graph. A layer's K (and V) is one buffer ``[B, slots + 1, D]`` (the extra slot swallows
padding); KV head ``h`` owns ``linear + ring`` slots of it:

- ``linear`` slots hold positions ``0, 1, ...`` in place: every position of an ``all`` head
  (``linear = max_length``), the ``N`` sinks of a ``sink:N`` head.
- a ring of ``window + 2S`` slots holds every later position ``p`` at ``p mod ring``: the previous
  and the current segment, plus the window just before them. A new key overwrites one that no query
  of its segment or later can read, and a query sees a ring slot when its position is at least
  ``history_end(s) - window`` (and past the linear part).

So a ``none`` head holds two segments, ``sink:N+window:W`` holds ``N + W + 2S`` keys, and ``all``
the whole sequence (:func:`policy_capacity`). Attention of one decoding step runs over the whole
layer in one call (``decode_attention``: ``triton``, the split-KV kernel of
:mod:`segtrain.kernels.decode_attention`; ``sdpa``, masked SDPA per policy group; ``torch``, the exact
:func:`segment_block_attention` on any device and dtype). A block of many queries (prefill) runs
SDPA with a lower-right causal mask over the keys gathered in position order, or the ``torch`` path.

``offload_history``: an ``all`` head keeps only its ring of two segments on the device; every key
is also written to (pinned) host memory, and the history (keys before the previous segment) is
streamed back one layer at a time, prefetched on a side stream on CUDA. That needs the positions on
the host, so it runs eagerly (no CUDA graph) with the ``torch`` attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from segtrain.attention import segment_block_attention
from segtrain.policy import HeadPolicy, PolicyTable, history_end

__all__ = [
    "DECODE_ATTENTION",
    "Block",
    "HeadLayout",
    "SegmentKVCache",
    "lower_right_sdpa",
    "policy_capacity",
    "slot_positions",
    "store_slots",
]

DECODE_ATTENTION = ("triton", "sdpa", "torch")


@dataclass(frozen=True)
class HeadLayout:
    """Where one KV head's keys live in its layer's buffer: ``linear`` slots by position, then a ring."""

    offset: int  # first slot of this head in the layer's buffer
    linear: int  # positions p < linear sit at offset + p
    ring: int  # later positions sit at offset + linear + p % ring
    window: int  # a ring slot is readable from history_end(s) - window on

    @classmethod
    def for_policy(cls, policy: HeadPolicy, segment_size: int, max_length: int, offload: bool = False) -> HeadLayout:
        if policy.all and not offload:
            return cls(0, max_length, 0, 0)
        if policy.all:  # offloaded: the device keeps the local segments, history comes from the host
            return cls(0, 0, min(2 * segment_size, max_length), 0)
        linear = min(policy.sink, max_length)
        return cls(0, linear, max(1, min(policy.window + 2 * segment_size, max_length - linear)), policy.window)

    @property
    def capacity(self) -> int:
        return self.linear + self.ring


def policy_capacity(policy: HeadPolicy, segment_size: int, max_length: int, offload: bool = False) -> int:
    """Most keys one row of a head with ``policy`` holds on the device, for sequences up to ``max_length``."""
    return HeadLayout.for_policy(policy, segment_size, max_length, offload).capacity


def store_slots(heads: Tensor, positions: Tensor, trash: int) -> Tensor:
    """Slot of each new key: ``heads [4, H]`` (offset, linear, ring, window), ``positions [B, n]`` (-1: padding,
    stored at ``trash``) -> ``[B, H, n]``."""
    offset, linear, ring = (heads[i][None, :, None].long() for i in range(3))
    p = positions[:, None, :]
    slot = offset + torch.where(p < linear, p, linear + torch.remainder(p, ring.clamp(min=1)))
    return torch.where(p >= 0, slot, trash)


def slot_positions(layout: HeadLayout, last: Tensor, segment_size: int) -> Tensor:
    """``[B, capacity]``: the position each of a head's slots holds once position ``last [B]`` is stored, or -1
    where its policy does not let queries in ``last``'s segment read it (queries still apply ``<= t``)."""
    i = torch.arange(layout.capacity, device=last.device)
    t = last[:, None]
    if not layout.ring:
        return i.expand(last.shape[0], -1)
    p = t - torch.remainder(t - (i - layout.linear), layout.ring)
    end = ((t // segment_size - 1).clamp(min=0)) * segment_size
    lo = (end - layout.window).clamp(min=max(0, layout.linear))
    return torch.where(i < layout.linear, i, torch.where(p >= lo, p, -1))


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

    @property
    def lasts(self) -> tuple[int, ...]:
        """Each row's last position after the block (-1 for a row that sits out)."""
        return tuple(s + n - 1 if n else -1 for s, n in zip(self.starts, self.counts))

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


@dataclass
class _Group:
    """A layer's KV heads that share a policy: their layout and views ``[B, heads, capacity, D]`` of the layer's buffers."""

    policy: HeadPolicy
    layout: HeadLayout  # offset of the group's first head
    kv_heads: slice | Tensor
    q_heads: slice | Tensor
    k: Tensor
    v: Tensor
    host_k: Tensor | None = None  # offloaded: [B, max_length, heads, D], position-major
    host_v: Tensor | None = None


@dataclass
class _Layer:
    k: Tensor  # [B, slots + 1, D]
    v: Tensor
    groups: list[_Group]
    layouts: tuple[HeadLayout, ...]  # per KV head, model order
    heads: Tensor  # [4, Hkv] int32: offset, linear, ring, window

    @property
    def trash(self) -> int:
        return self.k.shape[1] - 1

    @property
    def max_capacity(self) -> int:
        return max(lay.capacity for lay in self.layouts)


class SegmentKVCache:
    """Per-(layer, KV head) KV cache of a batch of sequences, sized by each head's policy.

    Use: ``begin_block(block)`` (host positions: prefill, eager decoding) or ``begin_decode(positions)``
    (a device tensor: the graph-captured step) once per step, then ``attend(layer, q, k, v)`` per
    layer (stores the step's K/V, returns the attention output).
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
        decode_attention: str = "torch",
        scale: float | None = None,
    ):
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        if offload_history and decode_attention != "torch":
            raise ValueError("offload_history needs decode_attention='torch' (the history comes from host memory)")
        self.policies, self.segment_size, self.max_length = policies, segment_size, max_length
        self.batch_size, self.device, self.sdpa_prefill = batch_size, torch.device(device), sdpa_prefill
        self.offload_history, self.decode_attention = offload_history, decode_attention
        self.scale = scale if scale is not None else head_dim**-0.5
        group = num_heads // policies.n_kv_heads
        pin = self.device.type == "cuda"
        tables: dict[tuple[HeadLayout, ...], Tensor] = {}
        self.layers: list[_Layer] = []
        for row in policies.layers:
            layouts: list[HeadLayout | None] = [None] * len(row)
            spans = []
            slots = 0
            for policy in dict.fromkeys(row):  # distinct policies in head order; a group's heads are adjacent slots
                heads = [h for h, p in enumerate(row) if p == policy]
                offload = offload_history and policy.all
                base = HeadLayout.for_policy(policy, segment_size, max_length, offload)
                spans.append((policy, heads, replace(base, offset=slots), offload))
                for h in heads:
                    layouts[h] = replace(base, offset=slots)
                    slots += base.capacity
            k = torch.zeros(batch_size, slots + 1, head_dim, dtype=dtype, device=self.device)
            v = torch.zeros_like(k)
            groups = []
            for policy, heads, layout, offload in spans:
                a, b = layout.offset, layout.offset + len(heads) * layout.capacity
                view = (batch_size, len(heads), layout.capacity, head_dim)
                g = _Group(
                    policy,
                    layout,
                    _as_index(heads, self.device),
                    _as_index([h * group + i for h in heads for i in range(group)], self.device),
                    k[:, a:b].view(view),
                    v[:, a:b].view(view),
                )
                if offload:
                    host = (batch_size, max_length, len(heads), head_dim)
                    g.host_k, g.host_v = (torch.zeros(host, dtype=dtype, pin_memory=pin) for _ in range(2))
                groups.append(g)
            key = tuple(layouts)
            if key not in tables:  # layers with the same policies share the table (and the step's slots)
                cols = [(lay.offset, lay.linear, lay.ring, lay.window) for lay in key]
                tables[key] = torch.tensor(cols, dtype=torch.int32, device=self.device).T.contiguous()
            self.layers.append(_Layer(k, v, groups, key, tables[key]))
        self._rows = torch.arange(batch_size, device=self.device)[:, None, None]
        self._counters = torch.zeros(batch_size * policies.n_kv_heads, dtype=torch.int32, device=self.device)  # the kernel's
        self._block: Block | None = None
        self._q_pos: Tensor | None = None  # [B, n] query positions of the step, -1 on padding
        self._last: Tensor | None = None  # [B] each row's last position in this step (-1: sits it out)
        self._stored = torch.full((batch_size,), -1, dtype=torch.long, device=self.device)  # last position stored, per row
        self._slots: dict[int, Tensor] = {}  # id(heads table) -> [B, Hkv, n]
        self._ends: list[int] = [0] * batch_size  # offload: each row's history end (host)
        self._staged: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}
        self._stream = torch.cuda.Stream(self.device) if offload_history and pin else None

    # -- steps ---------------------------------------------------------------------------------

    def begin_block(self, block: Block) -> None:
        """Prepare a step whose positions the host knows (prefill, eager decoding)."""
        if len(block.counts) != self.batch_size:
            raise ValueError(f"block has {len(block.counts)} rows, the cache {self.batch_size}")
        S = self.segment_size
        for row, (start, n) in enumerate(zip(block.starts, block.counts)):
            if n and start // S != (start + n - 1) // S:
                raise ValueError(f"row {row}: block [{start}, {start + n}) crosses a segment boundary (segment_size={S})")
            if n and start + n > self.max_length:
                raise RuntimeError(f"row {row}: position {start + n - 1} is beyond the cache's max_length={self.max_length}")
        self._block = block
        self._ends = [history_end(t // S, S) if t >= 0 else 0 for t in block.lasts]
        self._begin(block.positions(self.device), torch.tensor(block.lasts, device=self.device))
        self._staged.clear()
        self.prefetch(0)

    def begin_decode(self, positions: Tensor) -> None:
        """Prepare a decoding step at device ``positions [B]`` (one new token per row): device work only."""
        if self.offload_history:
            raise RuntimeError("offload_history decodes with host positions: use begin_block")
        self._block = None
        self._begin(positions[:, None], positions)

    def _begin(self, q_pos: Tensor, last: Tensor) -> None:
        self._q_pos, self._last = q_pos, last
        torch.maximum(self._stored, last, out=self._stored)
        self._slots = {}
        for layer in self.layers:
            if id(layer.heads) not in self._slots:
                self._slots[id(layer.heads)] = store_slots(layer.heads, q_pos, layer.trash)

    # -- offloaded history ---------------------------------------------------------------------

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer``'s offloaded history to the device (side stream on CUDA)."""
        if not self.offload_history or layer >= len(self.layers) or layer in self._staged:
            return
        staged = {}
        end = max(self._ends)
        for i, g in enumerate(self.layers[layer].groups):
            if g.host_k is None or end == 0:
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

    def _write_host(self, g: _Group, k: Tensor, v: Tensor) -> None:
        """Offloaded group: every new key also goes to host memory (its history later)."""
        for row, (start, n) in enumerate(zip(self._block.starts, self._block.counts)):
            if n:
                g.host_k[row, start : start + n].copy_(k[row, g.kv_heads, :n].transpose(0, 1), non_blocking=True)
                g.host_v[row, start : start + n].copy_(v[row, g.kv_heads, :n].transpose(0, 1), non_blocking=True)

    # -- attention -----------------------------------------------------------------------------

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the step's ``k, v [B, Hkv, n, D]`` for ``layer`` and attend ``q [B, Hq, n, D]``; returns ``[B, Hq, n, D]``."""
        if self._q_pos is None or q.shape[2] != self._q_pos.shape[1]:
            raise RuntimeError("call begin_block(block) or begin_decode(positions) before attend, with k/v of the step's width")
        lay = self.layers[layer]
        n = q.shape[2]
        kernel = n == 1 and self.decode_attention == "triton"
        if kernel:
            from segtrain.kernels.decode_attention import decode_attention, default_launch
        hand_over = kernel and default_launch().store  # the kernel stores the step's K/V itself
        if not hand_over:
            slots = self._slots[id(lay.heads)]
            lay.k.index_put_((self._rows, slots), k)
            lay.v.index_put_((self._rows, slots), v)
        if kernel:
            out = decode_attention(
                q[:, :, 0],
                lay.k,
                lay.v,
                self._last,
                lay.heads,
                max_capacity=lay.max_capacity,
                total_slots=sum(x.capacity for x in lay.layouts),
                segment_size=self.segment_size,
                scale=self.scale,
                k_new=k[:, :, 0] if hand_over else None,
                v_new=v[:, :, 0] if hand_over else None,
                counters=self._counters,
            )
            self._staged.pop(layer, None)
            return out[:, :, None]
        outs = []
        for i, g in enumerate(lay.groups):
            history = None
            if g.host_k is not None:
                self._write_host(g, k, v)
                history = self._history(layer, i)
            if n == 1 and self.decode_attention == "sdpa":
                o = self._sdpa_decode(g, q[:, g.q_heads])
            elif self.sdpa_prefill and n > 1:
                o = self._sdpa_block(g, q[:, g.q_heads], history)
            else:
                o = self._torch_group(g, q[:, g.q_heads], history)
            outs.append((g.q_heads, o))
        self._staged.pop(layer, None)
        if len(outs) == 1:
            return outs[0][1]
        out = torch.empty_like(q)
        for heads, o in outs:
            out[:, heads] = o
        return out

    def _torch_group(self, g: _Group, q: Tensor, history) -> Tensor:
        """Exact attention of the step's queries over the group's slots (and offloaded history), any device and dtype."""
        positions = slot_positions(g.layout, self._last, self.segment_size)
        k, v = g.k, g.v
        if not g.layout.ring and self._block is not None:  # linear only: nothing past the last position
            used = max(self._block.lasts) + 1
            k, v, positions = k[:, :, :used], v[:, :, :used], positions[:, :used]
        k_hist = v_hist = valid = None
        if history is not None:
            k_hist, v_hist = history
            ends = torch.tensor(self._ends, device=q.device)
            valid = (torch.arange(k_hist.shape[2], device=q.device) < ends[:, None])[:, None].expand(-1, k_hist.shape[1], -1)
        out, _ = segment_block_attention(
            q, k, v, k_hist, v_hist, q_positions=self._q_pos, local_positions=positions, history_valid=valid, scale=self.scale
        )
        return out

    def _sdpa_decode(self, g: _Group, q: Tensor) -> Tensor:
        """One query per row: the group's query heads become queries of their KV head, under a mask of what it sees."""
        B, Hq, _, D = q.shape
        positions = slot_positions(g.layout, self._last, self.segment_size)
        mask = (positions >= 0) & (positions <= self._last[:, None])
        heads = g.k.shape[1]
        qg = q.reshape(B, heads, Hq // heads, D)
        out = F.scaled_dot_product_attention(qg, g.k, g.v, attn_mask=mask[:, None, None, :], scale=self.scale)
        return out.reshape(B, Hq, 1, D)

    def _ordered(self, g: _Group, rows: slice, last: int, end: int, history) -> tuple[Tensor, Tensor]:
        """The keys rows see, in position order ``[history, sinks, window, previous, current]`` (a copy for ring keys)."""
        lay = g.layout
        pieces = []
        if history is not None and end:
            pieces.append((history[0][rows, :, :end], history[1][rows, :, :end]))
        n_linear = min(lay.linear, last + 1)
        if n_linear:
            pieces.append((g.k[rows, :, :n_linear], g.v[rows, :, :n_linear]))
        if lay.ring:
            lo = max(lay.linear, end - lay.window, 0)
            if lo <= last:
                idx = lay.linear + torch.remainder(torch.arange(lo, last + 1, device=g.k.device), lay.ring)
                pieces.append((g.k[rows].index_select(2, idx), g.v[rows].index_select(2, idx)))
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat([p[0] for p in pieces], 2), torch.cat([p[1] for p in pieces], 2)

    def _sdpa_block(self, g: _Group, q: Tensor, history) -> Tensor:
        """A block of queries (prefill): SDPA with a lower-right causal mask over the keys in position order."""
        block = self._block
        lasts = block.lasts
        if block.uniform:
            k, v = self._ordered(g, slice(None), lasts[0], self._ends[0], history)
            return lower_right_sdpa(q, k, v, self.scale)
        out = torch.zeros_like(q)
        for row, n in enumerate(block.counts):
            if n:
                rows = slice(row, row + 1)
                k, v = self._ordered(g, rows, lasts[row], self._ends[row], history)
                out[rows, :, :n] = lower_right_sdpa(q[rows, :, :n], k, v, self.scale)
        return out

    # -- inspection ----------------------------------------------------------------------------

    def _head(self, layer: int, kv_head: int) -> tuple[_Group, int]:
        lay = self.layers[layer]
        layout = lay.layouts[kv_head]
        for g in lay.groups:
            first = g.layout.offset
            if first <= layout.offset < first + g.k.shape[1] * g.layout.capacity:
                return g, (layout.offset - first) // g.layout.capacity
        raise AssertionError("head not in any group")

    def held_positions(self, layer: int, kv_head: int, row: int) -> list[int]:
        """Positions of (layer, KV head, row) that queries in the last stored position's segment can read."""
        last = int(self._stored[row])
        g, _ = self._head(layer, kv_head)
        held = [p for p in slot_positions(g.layout, self._stored[row : row + 1], self.segment_size)[0].tolist() if 0 <= p <= last]
        if g.host_k is not None:
            held += range(history_end(last // self.segment_size, self.segment_size))
        return sorted(held)

    def key_value(self, layer: int, kv_head: int, row: int, position: int) -> tuple[Tensor, Tensor]:
        """The stored K and V ``[D]`` of ``position`` (tests)."""
        g, j = self._head(layer, kv_head)
        if g.host_k is not None and position < history_end(int(self._stored[row]) // self.segment_size, self.segment_size):
            return g.host_k[row, position, j], g.host_v[row, position, j]
        positions = slot_positions(g.layout, self._stored[row : row + 1], self.segment_size)[0]
        slot = int((positions == position).nonzero()[0, 0])
        return g.k[row, j, slot], g.v[row, j, slot]

    def capacity(self, layer: int, kv_head: int) -> int:
        """Device slots per row allocated for (layer, KV head)."""
        return self.layers[layer].layouts[kv_head].capacity

    def tensors(self) -> list[Tensor]:
        """Every K/V buffer (device, and host for offloaded history): benchmarks fill them with random values."""
        out = []
        for lay in self.layers:
            out += [lay.k, lay.v] + [t for g in lay.groups for t in (g.host_k, g.host_v) if t is not None]
        return out

    def memory_bytes(self) -> int:
        """Bytes of device memory the cache holds (K/V buffers)."""
        return sum(lay.k.nbytes + lay.v.nbytes for lay in self.layers)

    def offloaded_bytes(self) -> int:
        """Bytes of host memory holding offloaded history."""
        return sum(t.nbytes for lay in self.layers for g in lay.groups for t in (g.host_k, g.host_v) if t is not None)
