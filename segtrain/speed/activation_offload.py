"""Host offload of what checkpointed layers keep for backward (the ``portable.activation.offload`` training option).

A checkpointed layer keeps its input until its backward; one that keeps its attention
(``keep_attention``) also keeps the slot's q, k, v, out and log-sum-exp: 0.35 GiB per
layer at the 1B shape and 32K tokens, which is why only a few layers fit in memory. This moves those tensors to
pinned host memory during the forward, on a side stream, and brings each layer's back one layer ahead during the
backward, on another, so the copies run beside the compute instead of in its way (measured on an H200: PCIe moves
a layer's 0.45 GiB in about 11 ms each way; the layer's forward takes about 18 ms and its backward about 30).

It works through ``torch.autograd.graph.saved_tensors_hooks`` around each layer's forward: whatever autograd
saves there, the slot's tensors and the checkpoint's inputs, goes through :meth:`ActivationOffload.pack`. What
the checkpoint recomputes in backward is saved by the checkpoint's own hooks and never reaches these. Tensors under
``min_bytes`` stay (the RoPE tables every layer shares, the LSE), and so do the last layer's (its backward comes
first) and those of layers that are not checkpointed (too many to move). Values come back bit for bit.
:mod:`segtrain.speed.portable` decides which layers offload and runs each one's forward through :meth:`ActivationOffload.run`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

__all__ = ["ActivationOffload"]


class _Saved:
    """One saved tensor's place in its layer's group (several saves of one tensor share a place)."""

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int):
        self.group, self.index = group, index


class _Group:
    """What one layer saved in one forward: host copies, and their device copies once fetched back."""

    def __init__(self, previous: _Group | None):
        self.previous = previous  # the layer before: fetched while this one runs its backward
        self.host: list[Tensor] = []
        self.uses: list[int] = []  # saves not yet unpacked, per place
        self.places: dict[tuple, int] = {}
        self.originals: list[Tensor] = []  # held until the layer's forward ends, so no address is reused meanwhile
        self.device: dict[int, Tensor] | None = None
        self.fetched: torch.cuda.Event | None = None


class ActivationOffload:
    """Offloads the tensors autograd saves inside :meth:`layer` to host memory, and fetches them back ahead of use.

    On CUDA the host copies are pinned and both directions run on side streams; on CPU (tests) they are plain
    copies, so the same bookkeeping runs everywhere.
    """

    def __init__(self, min_bytes: int = 8 << 20):
        self.min_bytes = min_bytes
        self.groups: dict[int, _Group] = {}  # this forward's group per layer index
        self.streams: tuple | None = None  # (device -> host, host -> device), made on first CUDA use
        self.in_backward = False
        self.active: _Group | None = None  # the layer whose backward is running

    @contextlib.contextmanager
    def layer(self, index: int):
        """Offload what is saved for backward inside this block, as layer ``index`` of the forward."""
        group = _Group(self.groups.get(index - 1) if index > 0 else None)
        self.groups = {i: g for i, g in self.groups.items() if i < index}  # a new forward starts over at layer 0
        self.groups[index] = group
        try:
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, group), self.unpack):
                yield
        finally:
            group.originals.clear()

    def run(self, index: int | None, before: list[int], forward, *args):
        """``forward(*args)`` as layer ``index`` (None: it keeps its tensors); its output's gradient hook starts fetching
        the offloaded layers ``before`` it (nearest first), which backpropagate next."""
        if not torch.is_grad_enabled():  # evaluation and inference save nothing
            return forward(*args)
        with self.layer(index) if index is not None else contextlib.nullcontext():
            out = forward(*args)
        groups = [self.groups[j] for j in before if j in self.groups]
        if groups and isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self.prefetch, groups))
        return out

    def _streams(self, device: torch.device):
        if self.streams is None:
            self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self.streams

    def pack(self, group: _Group, t: Tensor):
        if t.numel() * t.element_size() < self.min_bytes or _is_parameter(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        if key in group.places:
            index = group.places[key]
            group.uses[index] += 1
            return _Saved(group, index)
        if t.is_cuda:
            d2h, _ = self._streams(t.device)
            host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
            d2h.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(d2h):
                host.copy_(t, non_blocking=True)
            t.record_stream(d2h)  # the allocator keeps t's memory until the copy is done; t itself can go now
        else:
            host = t.detach().clone()
        group.originals.append(t)
        group.places[key] = len(group.host)
        group.host.append(host)
        group.uses.append(1)
        return _Saved(group, len(group.host) - 1)

    def unpack(self, saved):
        if isinstance(saved, Tensor):
            return saved
        group = saved.group
        if not self.in_backward:  # first unpack of this backward: drop what was fetched but not used when it ends
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)  # as FSDP does
        if group is not self.active:  # the layer after it is done with its backward (layers run in reverse)
            if self.active is not None and self.active.device:
                self.active.device.clear()  # copies no save asked for: autograd skips nodes no gradient needs
            self.active = group
        self._fetch(group)
        if group.previous is not None:
            self._fetch(group.previous)  # one layer ahead: its copy runs during this layer's backward
        t = group.device.get(saved.index)
        if t is None:  # unpacked once more than saved (retain_graph): fetch it again, now
            t = self._to_device(group.host[saved.index], group)
            group.device[saved.index] = t
        if t.is_cuda:
            torch.cuda.current_stream(t.device).wait_event(group.fetched)
            t.record_stream(torch.cuda.current_stream(t.device))
        group.uses[saved.index] -= 1
        if group.uses[saved.index] <= 0:
            group.device.pop(saved.index)  # autograd holds it for as long as the backward node needs it
        return t

    def _backward_done(self) -> None:
        self.in_backward, self.active = False, None
        for g in self.groups.values():
            if g.device:
                g.device.clear()

    def prefetch(self, groups: list[_Group], grad: Tensor | None = None) -> None:
        """Start bringing ``groups`` back, nearest first (a gradient hook: ``grad`` passes unchanged)."""
        for group in groups:
            self._fetch(group)

    def _fetch(self, group: _Group) -> None:
        if group.device is not None:
            return
        group.device = {i: self._to_device(host, group) for i, host in enumerate(group.host)}

    def _to_device(self, host: Tensor, group: _Group | None = None) -> Tensor:
        if not host.is_pinned():
            return host.clone()
        device = torch.device("cuda", torch.cuda.current_device())
        _, h2d = self._streams(device)
        h2d.wait_stream(torch.cuda.current_stream(device))  # the copies below may reuse memory freed before now
        with torch.cuda.stream(h2d):
            t = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
            t.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(h2d)
        if group is not None:
            group.fetched = event
        return t


def _is_parameter(t: Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)
