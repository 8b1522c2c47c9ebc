"""What fills the attention slots during calibration: one gate per KV head between ``all`` and a bounded policy.

:class:`GatedAttention` runs the layer's own segment attention twice, every KV head ``all`` and every
KV head the bounded policy (same segment size, backend, scale and carry_grad as the slot's original),
and returns ``bounded + alpha * (all - bounded)`` per KV head: a KV head's gate applies to its whole
GQA group of query heads, as a policy does. So the calibrated model is exactly what segtrain trains
and serves with once each gate is rounded to 0 or 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segtrain.attention import SegmentAttention, segment_attention
from segtrain.policy import HeadPolicy

__all__ = ["GatedAttention", "HeadGates", "with_policy"]


class HeadGates(nn.Module):
    """``alpha [layers, KV heads]``, kept in ``[0, 1]`` (:meth:`clamp_` after each optimizer step)."""

    def __init__(self, n_layers: int, n_kv_heads: int, initial: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n_layers, n_kv_heads), float(initial), dtype=dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.alpha.clamp_(0.0, 1.0)

    def tolist(self) -> list[list[float]]:
        return self.alpha.detach().cpu().tolist()


def with_policy(original: SegmentAttention, policy: str | HeadPolicy | tuple[HeadPolicy, ...]) -> SegmentAttention:
    """The slot's attention with another policy (one for every KV head, or one per KV head); all else the same."""
    return SegmentAttention(
        segment_size=original.segment_size,
        policy=policy,
        n_kv_heads=len(original.policy),
        backend=original.backend,
        carry_grad=original.carry_grad,
        scale=original.scale,
        layer=original.layer,
    )


class GatedAttention(nn.Module):
    """``(q, k, v) -> bounded + alpha[layer, h] * (all - bounded)``, ``h`` the KV head of each query head.

    The mixture is computed in float32 (float64 stays float64) so that the gates' gradient, a sum over
    every position and channel, is not rounded to the model's bfloat16.
    """

    def __init__(self, original: SegmentAttention, bounded: str | HeadPolicy, gates: HeadGates):
        super().__init__()
        self.original, self.bounded, self.gates = original, HeadPolicy.parse(bounded), gates

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        o = self.original
        common = dict(segment_size=o.segment_size, backend=o.backend, scale=o.scale, carry_grad=o.carry_grad)
        full = segment_attention(q, k, v, policy="all", **common)
        bounded = segment_attention(q, k, v, policy=self.bounded, **common)
        dtype = torch.promote_types(q.dtype, torch.float32)
        alpha = self.gates.alpha[o.layer].to(dtype).repeat_interleave(q.shape[1] // k.shape[1])  # [Hq]
        mixed = bounded.to(dtype) + alpha[None, :, None, None] * (full.to(dtype) - bounded.to(dtype))
        return mixed.to(q.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.original.layer}, bounded={str(self.bounded)!r}"
