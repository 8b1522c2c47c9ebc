"""The attention slot: the one place in a decoder layer where attention is computed.

Every decoder layer (the portable model's ``Attention``, the megatron model's core attention) holds
one :class:`SegmentAttention` module as ``core_attention``. Whatever changes how attention runs fills
that slot instead of changing the model: context parallelism puts its exchange there
(:mod:`segtrain.parallel.apply`), a benchmark plain causal attention (the inference engine instead runs each
layer as one step with its KV cache as the attention). :func:`fill_slots` swaps every slot of a model and
:func:`restore_slots` (or leaving the ``filled_slots`` block) puts the originals back. A slot's
original :class:`SegmentAttention` says what the layer computes: segment size, the layer's policy per
KV head, backend, whether gradient crosses the segment boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from segtrain.policy import HeadPolicy, as_head_policies

__all__ = ["SegmentAttention", "attention_slots", "fill_slots", "filled_slots", "restore_slots"]

SLOT = "core_attention"


class SegmentAttention(nn.Module):
    """``segment_attention`` of one layer: ``(q [B, Hq, T, D], k, v [B, Hkv, T, D]) -> [B, Hq, T, D]``. No parameters."""

    def __init__(
        self,
        *,
        segment_size: int,
        policy: str | HeadPolicy | Sequence[str | HeadPolicy],
        n_kv_heads: int,
        backend: str = "auto",
        carry_grad: bool = True,
        scale: float | None = None,
        layer: int = 0,
    ):
        super().__init__()
        self.segment_size, self.backend, self.carry_grad, self.scale, self.layer = segment_size, backend, carry_grad, scale, layer
        self.policy: tuple[HeadPolicy, ...] = as_head_policies(policy, n_kv_heads)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents=None) -> Tensor:
        """``documents``: packed documents in document mode (:class:`~segtrain.attention.documents.Documents`)."""
        from segtrain.attention import segment_attention

        return segment_attention(q, k, v, segment_size=self.segment_size, policy=self.policy, backend=self.backend,
                                 scale=self.scale, carry_grad=self.carry_grad, documents=documents)  # fmt: skip

    def extra_repr(self) -> str:
        return f"layer={self.layer}, segment_size={self.segment_size}, backend={self.backend!r}, carry_grad={self.carry_grad}"


def attention_slots(model: nn.Module) -> list[tuple[nn.Module, SegmentAttention]]:
    """``(owner, original)`` of every slot of ``model``, in layer order; ``original`` is the slot's
    :class:`SegmentAttention`, also when the slot is filled now (a filler keeps it as ``.original``)."""
    slots = []
    for module in model.modules():
        current = module._modules.get(SLOT)
        if current is None:
            continue
        original = current if isinstance(current, SegmentAttention) else getattr(current, "original", None)
        if isinstance(original, SegmentAttention):
            slots.append((module, original))
    if not slots:
        raise TypeError(f"{type(model).__name__} has no attention slot ({SLOT}: SegmentAttention): not a segtrain model")
    return sorted(slots, key=lambda s: s[1].layer)


def fill_slots(model: nn.Module, make: Callable[[SegmentAttention], nn.Module]) -> nn.Module:
    """Fill every slot with ``make(original)`` (a module with the same call signature). Returns ``model``."""
    for owner, original in attention_slots(model):
        filler = make(original)
        if filler is not original:
            filler.original = original  # restore_slots finds it here
        setattr(owner, SLOT, filler)
    return model


def restore_slots(model: nn.Module) -> nn.Module:
    """Put every slot's original :class:`SegmentAttention` back."""
    for owner, original in attention_slots(model):
        setattr(owner, SLOT, original)
    return model


@contextlib.contextmanager
def filled_slots(model: nn.Module, make: Callable[[SegmentAttention], nn.Module]) -> Iterator[nn.Module]:
    """Slots filled by ``make`` inside the block, whatever filled them before restored after it."""
    before = [(owner, getattr(owner, SLOT)) for owner, _ in attention_slots(model)]
    fill_slots(model, make)
    try:
        yield model
    finally:
        for owner, module in before:
            setattr(owner, SLOT, module)
