"""Load balance of context parallelism: the split minimises the slowest rank's cost (brute force), the cost model
counts visible pairs, and the balanced split of the shipped 1B shape is much more even than the equal one."""

import itertools
import random

import pytest

from segtrain.config import load_model_config
from segtrain.parallel import CPSplitError, balanced_counts, balanced_ranges, imbalance, model_segment_costs, segment_costs
from segtrain.policy import PolicyTable, as_head_policies, visible_pairs


@pytest.mark.parametrize("seed", range(30))
def test_balanced_counts_is_optimal(seed):
    rng = random.Random(seed)
    n, world = rng.randint(1, 9), rng.randint(1, 4)
    costs = [rng.random() * 10 for _ in range(n)]
    if n < world:
        with pytest.raises(CPSplitError, match="every rank needs one"):
            balanced_counts(costs, world)
        return
    counts = balanced_counts(costs, world)
    assert sum(counts) == n and len(counts) == world and min(counts) >= 1
    best = min(  # every split into `world` non-empty contiguous runs
        max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n))) for cuts in itertools.combinations(range(1, n), world - 1)
    )
    assert max(sum(costs[a : a + c]) for a, c in zip(itertools.accumulate([0, *counts]), counts)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(20))
def test_capped_balanced_counts_is_optimal_under_the_cap(seed):
    rng = random.Random(seed)
    n, world = rng.randint(2, 9), rng.randint(1, 4)
    world = min(world, n)
    cap = rng.randint(-(-n // world), n)
    costs = [rng.random() * 10 for _ in range(n)]
    counts = balanced_counts(costs, world, max_count=cap)
    assert sum(counts) == n and len(counts) == world and min(counts) >= 1 and max(counts) <= cap
    best = min(
        max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
        for cuts in itertools.combinations(range(1, n), world - 1)
        if max(b - a for a, b in zip((0, *cuts), (*cuts, n))) <= cap
    )
    assert max(sum(costs[a : a + c]) for a, c in zip(itertools.accumulate([0, *counts]), counts)) == pytest.approx(best)
    with pytest.raises(CPSplitError, match="at most"):
        balanced_counts(costs, world, max_count=(n - 1) // world)  # too few slots for n segments


def test_token_cap_bounds_the_first_rank():
    cfg = load_model_config("llama3.2-1b")
    T, S = 32 * cfg.segment_size, cfg.segment_size
    free = balanced_ranges(cfg, T, 2)
    capped = balanced_ranges(cfg, T, 2, token_cap=1.1)
    even = balanced_ranges(cfg, T, 2, token_cap=1.0)
    assert (free[0][1] // S, capped[0][1] // S, even[0][1] // S) == (19, 17, 16)  # 1.1 x 16 segments: at most 17


@pytest.mark.parametrize("policy", ["none", "all", "sink:5+window:7", "window:3"])
def test_segment_costs_count_visible_pairs(policy):
    T, S = 45, 6
    policies = as_head_policies([policy, "all"], 2)
    assert sum(segment_costs(T, S, [policies, policies])) == 2 * visible_pairs(T, S, policies)


def test_balanced_split_of_the_1b_shape_is_even():
    cfg = load_model_config("llama3.2-1b")
    T = 64 * cfg.segment_size
    costs = model_segment_costs(cfg, T)
    for world in (2, 4):
        counts = balanced_counts(costs, world)
        assert imbalance(costs, counts) < 1.03 < imbalance(costs, [64 // world] * world)
        assert counts == sorted(counts, reverse=True)  # early ranks have less history: more segments
    ranges = balanced_ranges(cfg, T - 100, 4)  # a partial last segment stays on the last rank
    assert ranges[0][0] == 0 and ranges[-1][1] == T - 100 and all(a % cfg.segment_size == 0 for a, _ in ranges)


def test_first_k_tables_balance_by_attention_alone():
    table = PolicyTable.first_k(1, 4, 1)
    costs = segment_costs(64 * 4096, 4096, table.layers)
    assert imbalance(costs, [16] * 4) > 1.5 and imbalance(costs, balanced_counts(costs, 4)) < 1.02
