"""Segmented inference: the per-head KV cache and the generation engine (``segtrain generate``)."""

from segtrain.inference.cache import Block, SegmentKVCache, lower_right_sdpa, policy_capacity
from segtrain.inference.engine import GenerationOutput, SegmentedEngine, sample_next

__all__ = ["Block", "GenerationOutput", "SegmentKVCache", "SegmentedEngine", "lower_right_sdpa", "policy_capacity", "sample_next"]
