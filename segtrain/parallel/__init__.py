"""Parallelism by segments (DESIGN.md §4): context parallelism across whole segments."""

from segtrain.parallel.context import (
    CPSplitError,
    ExchangeBytes,
    context_parallel_ranges,
    context_parallel_segment_attention,
    exchange_bytes,
    shard_ranges,
)

__all__ = [
    "CPSplitError",
    "ExchangeBytes",
    "context_parallel_ranges",
    "context_parallel_segment_attention",
    "exchange_bytes",
    "shard_ranges",
]
