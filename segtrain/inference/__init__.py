"""Segmented inference: the per-head KV cache and the generation engine (``segtrain generate``).

Names resolve lazily (the cache and the engine import torch), so ``segtrain generate --help`` stays fast.
"""

from __future__ import annotations

from segtrain.lazy import lazy_getattr

_EXPORTS = {
    "Block": "cache",
    "HeadLayout": "cache",
    "SegmentKVCache": "cache",
    "lower_right_sdpa": "cache",
    "policy_capacity": "cache",
    "slot_positions": "cache",
    "store_slots": "cache",
    "Decoder": "engine",
    "GenerationOutput": "engine",
    "SegmentedEngine": "engine",
    "sample_next": "engine",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
