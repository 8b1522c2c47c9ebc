"""Load balance for context parallelism: how many whole segments each CP rank should own.

With ``all`` heads a query in segment ``s`` reads ``(s - 1) * S`` history keys, so an even split gives
later ranks more attention work (the slowest rank sets the step time). :func:`balanced_counts` splits
a sequence's per-segment costs into contiguous runs minimising the most expensive run (exact, by
dynamic programming: a sequence has tens of segments). :func:`segment_costs` is the cost model:
forward FLOPs of attention on visible (query, key) pairs only, plus the per-token dense work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from segtrain.parallel.context import CPSplitError, Ranges, shard_ranges
from segtrain.policy import HeadPolicy, history_end

__all__ = ["balanced_counts", "balanced_ranges", "imbalance", "model_segment_costs", "rank_costs", "segment_costs"]


def segment_costs(
    seq_len: int,
    segment_size: int,
    layers: Sequence[Sequence[HeadPolicy]],
    *,
    per_pair: float = 1.0,
    per_token: float = 0.0,
) -> list[float]:
    """Cost of each segment: ``per_pair`` x visible (query, key) pairs over all layers and KV heads + ``per_token`` x tokens."""
    S, costs = segment_size, []
    for s in range(math.ceil(seq_len / S)):
        lo, hi = s * S, min(seq_len, (s + 1) * S)
        n, end = hi - lo, history_end(s, S)
        band = n * min(S, lo) + n * (n + 1) // 2  # previous segment + causal own segment, per KV head
        pairs = sum(len(row) * band + sum(n * p.history_count(end) for p in row) for row in layers)
        costs.append(per_pair * pairs + per_token * n)
    return costs


def model_segment_costs(config, seq_len: int, *, dense: bool = True) -> list[float]:
    """Forward FLOPs per segment of a :class:`segtrain.config.ModelConfig` decoder.

    Attention: ``4 * head_dim`` per visible pair and query head (``QK^T`` and ``PV``). Dense
    (``dense=True``): ``2 x`` the multiply-adds of the projections, MLP and LM head per token.
    """
    c = config
    group = c.num_heads // c.num_kv_heads
    attn_proj = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    dense_per_layer = attn_proj + 3 * c.hidden_size * c.intermediate_size
    per_token = 2.0 * (c.num_layers * dense_per_layer + c.hidden_size * c.vocab_size) if dense else 0.0
    table = c.policy_table()
    return segment_costs(seq_len, c.segment_size, table.layers, per_pair=4.0 * c.head_dim * group, per_token=per_token)


def balanced_counts(costs: Sequence[float], world: int, *, max_count: int | None = None) -> list[int]:
    """Segments per rank (contiguous, at least one each) minimising the largest per-rank cost sum.

    ``max_count``: the most segments one rank may take. Balancing gives the first ranks more tokens (they
    read less history), hence more activation memory; the cap bounds that at some cost in balance.
    """
    n = len(costs)
    if world < 1 or n < world:
        raise CPSplitError(f"{n} segment(s) cannot be split over context-parallel size {world}: every rank needs one")
    cap = n if max_count is None else max_count
    if cap * world < n:
        raise CPSplitError(f"{n} segments cannot be split over context-parallel size {world} with at most {cap} per rank")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[w][i]: the smallest max cost of splitting the first i segments over w ranks; cut[w][i]: where the last run starts
    best = [[math.inf] * (n + 1) for _ in range(world + 1)]
    cut = [[0] * (n + 1) for _ in range(world + 1)]
    best[0][0] = 0.0
    for w in range(1, world + 1):
        for i in range(w, n - (world - w) + 1):
            for j in range(max(w - 1, i - cap), i):
                value = max(best[w - 1][j], prefix[i] - prefix[j])
                if value < best[w][i]:
                    best[w][i], cut[w][i] = value, j
    counts, i = [], n
    for w in range(world, 0, -1):
        counts.append(i - cut[w][i])
        i = cut[w][i]
    return counts[::-1]


def rank_costs(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
    out, a = [], 0
    for n in counts:
        out.append(sum(costs[a : a + n]))
        a += n
    return out


def imbalance(costs: Sequence[float], counts: Sequence[int]) -> float:
    """Slowest rank over the mean: 1.0 is perfect balance."""
    per_rank = rank_costs(costs, counts)
    return max(per_rank) / (sum(per_rank) / len(per_rank))


def balanced_ranges(config, seq_len: int, world: int, *, dense: bool = True, token_cap: float | None = None) -> Ranges:
    """Token ranges of the balanced uneven split of ``seq_len`` tokens of ``config``'s model over ``world`` CP ranks.

    ``token_cap``: no rank takes more than this multiple of the even share of segments (at least the even
    share rounded up), e.g. 1.1 bounds the first rank's extra activation memory near 10%.
    """
    costs = model_segment_costs(config, seq_len, dense=dense)
    max_count = None
    if token_cap is not None:
        max_count = max(math.ceil(len(costs) / world), math.floor(token_cap * len(costs) / world + 1e-9))
    counts = balanced_counts(costs, world, max_count=max_count)
    S = config.segment_size
    lengths = [n * S for n in counts[:-1]]
    return shard_ranges([*lengths, seq_len - sum(lengths)], S)
