"""Segmented inference: the per-head KV cache and the generation engine (``segtrain generate``)."""

from segtrain.inference.cache import (
    Block,
    HeadLayout,
    SegmentKVCache,
    lower_right_sdpa,
    policy_capacity,
    slot_positions,
    store_slots,
)
from segtrain.inference.engine import Decoder, GenerationOutput, SegmentedEngine, sample_next

__all__ = [
    "Block",
    "Decoder",
    "GenerationOutput",
    "HeadLayout",
    "SegmentKVCache",
    "SegmentedEngine",
    "lower_right_sdpa",
    "policy_capacity",
    "sample_next",
    "slot_positions",
    "store_slots",
]
