"""Detached-history offload (DESIGN.md §4): history K/V saved for backward waits in CPU memory.

History K/V is read-only (no gradient flows into it), so what autograd saves of it between forward
and backward can leave the GPU: after each context-parallel attention call it is copied to pinned
CPU memory on a side stream, and brought back on that stream when backward reaches the layer
above, so the copy overlaps that layer's backward. The aim: GPU memory for history stays at one or
two layers' worth whatever the context length. Measured on 2x H200 (tools/bench_cp.py, 1B shape,
8 layers, 64K tokens per GPU, docs/bench/cp_h200x2_1b_8layers_64k_offload_fixed.json): 2.1 GiB (CP=1)
and 3.0 GiB (CP=2) per step moved each way, 7/8 of it prefetched in time; memory after forward
58.8 -> 56.8 GiB (CP=1) and 72.2 -> 69.7 GiB (CP=2), peak 61.4 -> 59.3 and 75.1 -> 72.6 GiB, step
time +0.1-0.5%.

Scoped with ``torch.autograd.graph.saved_tensors_hooks`` around the attention only: a saved tensor
is offloaded when it is a view of a registered tensor (the history bank; on the FlexAttention path
the ``[live | bank]`` K/V, which backward only reads), or a floating-point tensor that needs no
gradient (a copy gathered from the bank); everything else autograd saves stays put. Views
of one bank share one copy. On CPU the same logic runs with plain copies (tests); on CUDA the
copies are pinned and asynchronous. One forward, one backward per saved graph (no
``retain_graph``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["HistoryOffload", "OffloadStats"]


@dataclass
class OffloadStats:
    """Bytes copied to the host in forward, back to the device in backward, and how much of that arrived in time."""

    offloaded: int = 0
    prefetched: int = 0
    hidden: int = 0  # prefetches that finished before backward needed them (CUDA event order; CPU: 0)
    waited: int = 0  # bytes backward had to wait for (not prefetched, or still in flight)


def _whole_storage(t: Tensor) -> Tensor:
    """A flat tensor over all of ``t``'s storage, so that views of it come back with their strides and offsets."""
    storage = t.untyped_storage()
    return t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))


class _Entry:
    """One offloaded storage: its host copy, the device copy once fetched, and how many saved tensors still need it.

    The device copy is held strongly until every saved tensor of this storage was unpacked once, then
    only weakly (autograd's unpacked tensors keep it alive while backward still uses them).
    """

    def __init__(self, host: Tensor, device: torch.device):
        self.host, self.device, self.users = host, device, 0
        self.device_copy: Tensor | None = None
        self.weak = None
        self.done = self.needed = None  # CUDA events: prefetch finished; backward reached the first use

    def fetched(self) -> Tensor | None:
        if self.device_copy is not None:
            return self.device_copy
        return None if self.weak is None else self.weak()


class _Packed:
    """What autograd keeps instead of a saved tensor: the entry and the view of it (unpack may be asked more than once)."""

    __slots__ = ("entry", "view", "unpacked")

    def __init__(self, entry: _Entry, view):
        self.entry, self.view, self.unpacked = entry, view, False


class HistoryOffload:
    """Moves saved history of CP attention to CPU memory after forward and prefetches it before backward."""

    def __init__(self, *, min_bytes: int = 0):
        self.stats = OffloadStats()
        self.min_bytes = min_bytes
        self._groups: dict[int, list[_Entry]] = {}
        self._ids = itertools.count()
        self._stream = None
        self._timed: list[tuple] = []
        self._pool: dict[tuple, list[Tensor]] = {}
        self._pending = None  # CUDA event: the last scope's copies to the host

    # --- forward -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self, *banks: Tensor):
        """Offload, inside this block, what autograd saves of ``banks`` (views included) and of other no-grad float tensors.

        Yields the group id to pass to :meth:`attach` with the block's output.
        """
        gid, entries, by_storage = next(self._ids), [], {}
        # Storage addresses only: autograd keeps this hook (and what it refers to) until backward, and a reference
        # to the banks themselves would keep their device memory alive after they were offloaded.
        bank_ptrs = {b.untyped_storage().data_ptr() for b in banks if b is not None}

        debug = gid == 0 and log.isEnabledFor(logging.DEBUG)  # what the first scope saves, and where

        def pack(t: Tensor):
            ptr = t.untyped_storage().data_ptr()
            registered = ptr in bank_ptrs
            keep = not t.is_floating_point() or t.nbytes < self.min_bytes or (t.requires_grad and not registered)
            if debug:
                log.debug("offload pack %s %s grad=%s bank=%s keep=%s", list(t.shape), t.dtype, t.requires_grad, registered, keep)
            if keep:
                return t
            entry = by_storage.get(ptr) if registered else None
            if entry is None:  # a bank (once for all its views), or a copy gathered from one
                entry = self._offload(_whole_storage(t))
                entries.append(entry)
                if registered:
                    by_storage[ptr] = entry
            entry.users += 1
            return _Packed(entry, (t.size(), t.stride(), t.storage_offset()))  # the same strides: backward rounds the same

        def unpack(packed):
            if isinstance(packed, Tensor):
                return packed
            entry = packed.entry
            full = self._fetch_now(entry)
            if not packed.unpacked:
                packed.unpacked = True
                entry.users -= 1
                if entry.users == 0:  # the unpacked tensors hold it now; autograd frees it after use
                    entry.weak, entry.device_copy = weakref.ref(full), None
            return full.as_strided(*packed.view)

        self._groups[gid] = entries
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield gid
        self._bound_run_ahead()

    def _bound_run_ahead(self) -> None:
        """Wait on the host for the previous scope's copies to the host.

        The caching allocator reuses offloaded device memory only after those copies ran, and the host
        otherwise enqueues the whole forward long before the GPU runs it: then nothing is reclaimed in
        time (measured: memory after forward unchanged with offload). One layer of run-ahead is kept.
        """
        if self._stream is None:
            return
        if self._pending is not None:
            self._pending.synchronize()
        self._pending = torch.cuda.Event()
        self._pending.record(self._stream)

    def attach(self, out: Tensor, gid: int) -> Tensor:
        """Prefetch group ``gid`` and the group before it when backward reaches ``out`` (the attention output)."""
        if out.requires_grad:
            out.register_hook(lambda grad: self._prefetch_groups(gid))
        return out

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _offload(self, t: Tensor) -> _Entry:
        self.stats.offloaded += t.nbytes
        if t.device.type != "cuda":
            return _Entry(t.detach().clone(), t.device)  # exercises the logic on CPU
        key = (tuple(t.shape), t.dtype)
        free = self._pool.get(key)
        host = free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # pinning is slow: reuse
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # its memory is not reused before the copy is done
        entry = _Entry(host, t.device)
        # back to the pool when autograd drops the entry; copies into and out of it all run on the side stream, in order
        weakref.finalize(entry, self._pool.setdefault(key, []).append, host)
        return entry

    # --- backward ------------------------------------------------------------------------------------------
    def _prefetch_groups(self, gid: int) -> None:
        for g in (gid, gid - 1):
            for entry in self._groups.get(g, []):
                self._prefetch(entry)
        self._groups.pop(gid, None)

    def _prefetch(self, entry: _Entry) -> None:
        if entry.users == 0 or entry.fetched() is not None:
            return
        self.stats.prefetched += entry.host.nbytes
        if entry.device.type != "cuda":
            entry.device_copy = entry.host.clone()
            return
        main = torch.cuda.current_stream(entry.device)
        entry.device_copy = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)  # main stream's pool
        stream = self._side_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            entry.device_copy.copy_(entry.host, non_blocking=True)
            entry.done = torch.cuda.Event(enable_timing=True)
            entry.done.record(stream)

    def _fetch_now(self, entry: _Entry) -> Tensor:
        full = entry.fetched()
        if full is None:  # never prefetched (or fetched and already freed): fetch in line
            self.stats.waited += entry.host.nbytes
            full = entry.host.clone() if entry.device.type != "cuda" else entry.host.to(entry.device, non_blocking=True)
            if entry.users > 0:
                entry.device_copy = full
            return full
        if entry.done is not None and entry.needed is None:
            main = torch.cuda.current_stream(entry.device)
            entry.needed = torch.cuda.Event(enable_timing=True)
            entry.needed.record(main)
            main.wait_event(entry.done)
            self._timed.append((entry.needed, entry.done, entry.host.nbytes))  # events only: the entry may go
        return full

    def settle(self) -> OffloadStats:
        """Wait for the device and count hidden bytes: prefetches that finished before backward needed them."""
        if self._timed:
            torch.cuda.synchronize()
            for needed, done, nbytes in self._timed:
                if needed.elapsed_time(done) <= 0:  # done recorded no later than needed
                    self.stats.hidden += nbytes
                else:
                    self.stats.waited += nbytes
            self._timed.clear()
        return self.stats
