import pytest
import torch

from segtrain.policy import (
    HeadPolicy,
    PolicyError,
    PolicyTable,
    as_head_policies,
    history_end,
    history_visible,
    policy_tensors,
    visible_pairs,
)


@pytest.mark.parametrize(
    "text, expected, canonical",
    [
        ("none", HeadPolicy(), "none"),
        ("all", HeadPolicy(all=True), "all"),
        ("sink:4", HeadPolicy(sink=4), "sink:4"),
        ("window:64", HeadPolicy(window=64), "window:64"),
        ("window:64+sink:4", HeadPolicy(sink=4, window=64), "sink:4+window:64"),
        (" sink:4 + window:64 ", HeadPolicy(sink=4, window=64), "sink:4+window:64"),
        ("all+sink:4", HeadPolicy(all=True), "all"),
    ],
)
def test_parse_and_canonical_form(text, expected, canonical):
    p = HeadPolicy.parse(text)
    assert p == expected
    assert str(p) == canonical
    assert HeadPolicy.parse(str(p)) == p


@pytest.mark.parametrize(
    "text, bad",
    [
        ("sink:x", "sink:x"),
        ("sink:0", "sink:0"),
        ("window:-3", "window:-3"),
        ("al", "al"),
        ("sink:4+windw:8", "windw:8"),
        ("", "''"),
        ("sink:4+sink:8", "sink:8"),
        ("none+all", "none"),
    ],
)
def test_bad_policy_names_the_token(text, bad):
    with pytest.raises(PolicyError, match=bad.replace("+", r"\+")):
        HeadPolicy.parse(text)


def test_history_ranges():
    assert HeadPolicy().history_ranges(100) == []
    assert HeadPolicy(all=True).history_ranges(100) == [(0, 100)]
    assert HeadPolicy(all=True).history_ranges(0) == []
    assert HeadPolicy(sink=4).history_ranges(2) == [(0, 2)]
    assert HeadPolicy(window=10).history_ranges(100) == [(90, 100)]
    assert HeadPolicy(window=10).history_ranges(6) == [(0, 6)]
    assert HeadPolicy(sink=4, window=10).history_ranges(100) == [(0, 4), (90, 100)]
    assert HeadPolicy(sink=4, window=10).history_ranges(12) == [(0, 12)]  # overlapping: merged
    assert history_end(0, 8) == 0 and history_end(1, 8) == 0 and history_end(3, 8) == 16


def test_vectorised_predicate_matches_ranges():
    policies = [HeadPolicy(), HeadPolicy(all=True), HeadPolicy(sink=3), HeadPolicy(window=5), HeadPolicy(sink=2, window=7)]
    all_, sink, window = (t[:, None] for t in policy_tensors(policies))
    keys = torch.arange(40)
    for end in [-8, 0, 1, 5, 12, 33, 40]:
        got = history_visible(all_, sink, window, keys[None], end)
        for h, p in enumerate(policies):
            want = torch.zeros(40, dtype=torch.bool)
            for lo, hi in p.history_ranges(end):
                want[lo:hi] = True
            assert torch.equal(got[h], want), (str(p), end)


def test_retained_ranges_never_readmit_a_key():
    S = 8
    for p in [HeadPolicy(), HeadPolicy(all=True), HeadPolicy(sink=3), HeadPolicy(window=5), HeadPolicy(sink=2, window=11)]:
        dropped: set[int] = set()
        for s in range(8):
            kept = set()
            for lo, hi in p.retained_ranges(s, S):
                kept |= set(range(lo, (s + 1) * S if hi is None else hi))
            assert not (kept & dropped), (str(p), s)
            # exactly what segment s can read: history by policy plus everything from the previous segment on
            readable = {j for lo, hi in p.history_ranges(history_end(s, S)) for j in range(lo, hi)}
            readable |= set(range(history_end(s, S), (s + 1) * S))
            assert kept == readable
            dropped |= set(range((s + 1) * S)) - kept


def test_visible_pairs_counts_keys():
    T, S = 37, 8
    policies = [HeadPolicy(), HeadPolicy(all=True), HeadPolicy(sink=2, window=3)]
    brute = 0
    for p in policies:
        for t in range(T):
            s = t // S
            end = history_end(s, S)
            brute += (t - end + 1) + p.history_count(end)
    assert visible_pairs(T, S, policies) == brute
    # all heads 'all' and S >= T: causal attention
    assert visible_pairs(T, 64, [HeadPolicy(all=True)]) == T * (T + 1) // 2


def test_as_head_policies():
    assert as_head_policies("all", 3) == (HeadPolicy(all=True),) * 3
    assert as_head_policies(["all", "none"], 2) == (HeadPolicy(all=True), HeadPolicy())
    with pytest.raises(PolicyError, match="3 entries for 2 KV heads"):
        as_head_policies(["all", "none", "none"], 2)


def test_policy_table_shortcuts():
    t = PolicyTable.first_k(3, 4, 1)
    assert t.n_layers == 3 and t.n_kv_heads == 4
    assert [str(p) for p in t[2]] == ["all", "none", "none", "none"]
    assert PolicyTable.from_spec({"fraction": 0.5, "rest": "sink:4"}, 2, 4).to_spec() == [["all", "all", "sink:4", "sink:4"]] * 2
    assert PolicyTable.from_spec("window:16", 2, 2) == PolicyTable.uniform(2, 2, "window:16")
    explicit = [["all", "none"], "sink:2"]
    assert PolicyTable.from_spec(explicit, 2, 2).to_spec() == [["all", "none"], ["sink:2", "sink:2"]]
    round_trip = PolicyTable.from_spec(t.to_spec(), 3, 4)
    assert round_trip == t
    assert PolicyTable.first_k(1, 4, 2).shard(1, 2).to_spec() == [["none", "none"]]


@pytest.mark.parametrize(
    "spec, match",
    [
        ([["all"], ["all", "none"]], "layer 0: policy has 1 entries for 2 KV heads"),
        ([["all", "none"]], "1 layers x 2 KV heads, the model has 2 x 2"),
        ({"first_k": 5}, "k=5"),
        ({"fraction": 0.5, "first_k": 1}, "exactly one of"),
        ({"fractoin": 0.5}, "unknown keys"),
        ([["all", "sink:q"], ["all", "all"]], "layer 0: bad history policy 'sink:q'"),
        (3, "cannot build a policy table from int"),
    ],
)
def test_bad_policy_tables(spec, match):
    with pytest.raises(PolicyError, match=match):
        PolicyTable.from_spec(spec, 2, 2)


def test_shard_must_divide():
    with pytest.raises(PolicyError, match="do not split over tensor-parallel size 3"):
        PolicyTable.uniform(1, 4, "all").shard(0, 3)
