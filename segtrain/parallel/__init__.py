"""Parallelism by segments (DESIGN.md §4): context parallelism applied to a model from outside; history offload."""

from segtrain.parallel.apply import ContextParallelAttention, apply_context_parallel, shard_batch
from segtrain.parallel.balance import balanced_counts, balanced_ranges, imbalance, model_segment_costs, segment_costs
from segtrain.parallel.context import (
    CPSplitError,
    ExchangeBytes,
    context_parallel_ranges,
    context_parallel_segment_attention,
    exchange_bytes,
    shard_ranges,
)
from segtrain.parallel.offload import HistoryOffload, OffloadStats

__all__ = [
    "CPSplitError",
    "ContextParallelAttention",
    "HistoryOffload",
    "OffloadStats",
    "apply_context_parallel",
    "balanced_counts",
    "balanced_ranges",
    "imbalance",
    "model_segment_costs",
    "segment_costs",
    "shard_batch",
    "ExchangeBytes",
    "context_parallel_ranges",
    "context_parallel_segment_attention",
    "exchange_bytes",
    "shard_ranges",
]
