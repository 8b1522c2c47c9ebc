"""What one context-parallel rank knows about an attention call: its part of the split and its live keys.

Passed whole to the exchange and attention functions of :mod:`segtrain.parallel.context` and
:mod:`segtrain.parallel.context_flex` instead of long positional lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from segtrain.policy import HeadPolicy

__all__ = ["LiveKV", "RankShare"]


@dataclass(frozen=True)
class RankShare:
    """Rank ``rank`` of a CP group holds tokens ``ranges[rank]`` of a sequence split into ``ranges``; ``policies``
    (one per local KV head) and ``segment_size`` are the layer's; ``stats`` (an ``ExchangeBytes``) counts bytes sent."""

    ranges: tuple[tuple[int, int], ...]
    rank: int
    segment_size: int
    policies: tuple[HeadPolicy, ...]
    group: Any = None
    stats: Any = None

    @property
    def lo(self) -> int:
        return self.ranges[self.rank][0]

    @property
    def hi(self) -> int:
        return self.ranges[self.rank][1]

    @property
    def key(self) -> tuple:
        """Hashable identity of the split and the rank (for caches of what depends on them only)."""
        return (self.ranges, self.rank)


class LiveKV(NamedTuple):
    """K/V a rank reads with gradient: positions ``[base, hi)``, the keys received from earlier ranks then its own."""

    k: Tensor
    v: Tensor
    base: int
