"""Segmented inference: the per-head KV cache and the generation engine (``segtrain generate``).

Names resolve lazily (the cache and the engine import torch), so ``segtrain generate --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Block": "cache",
    "SegmentKVCache": "cache",
    "lower_right_sdpa": "cache",
    "policy_capacity": "cache",
    "GenerationOutput": "engine",
    "SegmentedEngine": "engine",
    "sample_next": "engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"segtrain.inference.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'segtrain.inference' has no attribute {name!r}")
