"""Context parallelism by segments: CP=2 and CP=4 (gloo, spawned processes) equal the single-device operator."""

import datetime
import math
import os
import random

import oracle
import pytest
import torch
import torch.distributed as dist
from attention_cases import make_qkv
from spawned import spawn_workers

from segtrain.attention import segment_attention
from segtrain.parallel import (
    CPSplitError,
    ExchangeBytes,
    context_parallel_ranges,
    context_parallel_segment_attention,
    exchange_bytes,
    shard_ranges,
)
from segtrain.policy import history_end


def random_policy(rng: random.Random, span: int) -> str:
    """Sinks and windows up to a few shards long, so they cross rank boundaries."""
    n, w = rng.randint(1, 2 * span), rng.randint(1, 3 * span)
    return rng.choice(["none", "all", f"sink:{n}", f"window:{w}", f"sink:{n}+window:{w}", f"window:{w}"])


def random_case(seed: int, world: int) -> dict:
    rng = random.Random(seed)
    S = rng.choice([1, 2, 3, 4, 5])
    if rng.random() < 0.5:  # the balanced split, ranges given
        per = rng.randint(1, 3)  # segments per rank
        ranges = context_parallel_ranges(rng.randint((world - 1) * per * S + 1, world * per * S), S, world)
    else:  # an uneven split, ranges gathered from shard lengths; the last shard may end mid-segment
        lengths = [S * rng.randint(1, 3) for _ in range(world - 1)] + [rng.randint(1, 3 * S)]
        ranges = shard_ranges(lengths, S)
    hkv = rng.choice([1, 2, 3])
    D = rng.choice([4, 8])
    return dict(
        seed=seed,
        B=rng.choice([1, 2]),
        Hq=hkv * rng.choice([1, 2]),
        Hkv=hkv,
        D=D,
        Dv=rng.choice([D, 6]),
        S=S,
        ranges=ranges,
        give_ranges=rng.random() < 0.5,
        policies=[random_policy(rng, ranges[0][1]) for _ in range(hkv)],
    )


def full_inputs(c):
    """The whole sequence's q, k, v (v with its own head dim) and the upstream gradient, the same in every process."""
    T = c["ranges"][-1][1]
    q, k, _ = make_qkv(c["B"], c["Hq"], c["Hkv"], T, c["D"], seed=c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    v = torch.randn(c["B"], c["Hkv"], T, c["Dv"], generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(c["B"], c["Hq"], T, c["Dv"], generator=g, dtype=torch.float64)
    return q, k, v, w


def run_case(c, group, device):
    """This rank's output and gradients for its shard, and the bytes it sent."""
    rank = dist.get_rank(group)
    lo, hi = c["ranges"][rank]
    q, k, v, w = (t.detach().to(device) for t in full_inputs(c))
    q, k, v = (t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
    stats = ExchangeBytes()
    out = context_parallel_segment_attention(
        q,
        k,
        v,
        segment_size=c["S"],
        policy=c["policies"],
        group=group,
        ranges=c["ranges"] if c["give_ranges"] else None,
        stats=stats,
    )
    (out * w[:, :, lo:hi]).sum().backward()
    return dict(out=out.detach().cpu(), dq=q.grad.cpu(), dk=k.grad.cpu(), dv=v.grad.cpu(), stats=stats)


def _worker(rank, world, port, jobs, backend, out_dir):
    """``jobs``: ``(group ranks, cases)``, every group is created on every rank; a rank runs its groups' cases."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = {}
        groups = [dist.group.WORLD if len(ranks) == world else dist.new_group(ranks) for ranks, _ in jobs]
        for j, ((ranks, cases), group) in enumerate(zip(jobs, groups)):
            if rank not in ranks:
                continue
            for i, c in enumerate(cases):
                if c.get("expect_error"):
                    with pytest.raises(CPSplitError, match=c["expect_error"]):
                        run_case(c, group, device)
                    results[j, i] = "raised"
                else:
                    results[j, i] = run_case(c, group, device)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world, jobs, tmp_path, timeout=90, backend="gloo"):
    return spawn_workers(_worker, world, (jobs, backend), tmp_path, timeout)


def check_against_single_device(jobs, results):
    """Concatenate every group's shards and compare with segment_attention on the whole sequence."""
    history_sent = 0
    for j, (ranks, cases) in enumerate(jobs):
        for i, c in enumerate(cases):
            if c.get("expect_error"):
                assert all(results[r][j, i] == "raised" for r in ranks)
                continue
            shards = [results[r][j, i] for r in ranks]  # group rank order = sorted global ranks
            q, k, v, w = full_inputs(c)
            backend = "reference" if i % 2 else "math"
            ref = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend=backend)
            want = [ref, *torch.autograd.grad((ref * w).sum(), (q, k, v))]
            for name, expected in zip(("out", "dq", "dk", "dv"), want):
                got = torch.cat([sh[name] for sh in shards], 2)
                torch.testing.assert_close(got, expected, atol=1e-12, rtol=0, msg=lambda m, c=c, n=name: f"{n} of {c}: {m}")
            formula = exchange_bytes(
                c["ranges"],
                c["S"],
                c["policies"],
                batch=c["B"],
                n_kv_heads=c["Hkv"],
                head_dim=c["D"],
                v_head_dim=c["Dv"],
                element_size=8,
            )
            assert [sh["stats"] for sh in shards] == formula, c
            history_sent += sum(f.history for f in formula)
    assert history_sent > 0, "no case exchanged any history: the byte check is vacuous"


def none_case(world):
    c = random_case(7, world)
    return {**c, "policies": ["none"] * c["Hkv"]}


@pytest.mark.slow
def test_cp2_matches_single_device(tmp_path):
    cases = [random_case(1000 + i, 2) for i in range(12)] + [none_case(2)]
    bad = {**random_case(5, 2), "S": 3, "ranges": [(0, 4), (4, 8)], "give_ranges": False}  # rank 0 holds 4 tokens, S=3
    wrong = {**random_case(6, 2), "ranges": [(0, 4), (4, 8), (8, 9)], "give_ranges": True}  # three ranges for two ranks
    jobs = [([0, 1], cases + [{**bad, "expect_error": "rank 0 holds 4 tokens"}, {**wrong, "expect_error": "not 2 contiguous"}])]
    results = spawn(2, jobs, tmp_path)
    check_against_single_device(jobs, results)
    assert all(results[r][0, 12]["stats"].history == 0 for r in range(2))  # all heads 'none'
    assert results[0][0, 12]["stats"].carry > 0 and results[1][0, 12]["stats"].carry_grad > 0


@pytest.mark.slow
def test_cp4_and_subgroups_match_single_device(tmp_path):
    """CP=4 on the world; CP=2 on groups {0, 2} and {1, 3} (group ranks differ from global ranks); CP=1 alone."""
    jobs = [
        ([0, 1, 2, 3], [random_case(2000 + i, 4) for i in range(10)] + [none_case(4)]),
        ([0, 2], [random_case(3000 + i, 2) for i in range(4)]),
        ([1, 3], [random_case(4000 + i, 2) for i in range(4)]),
        ([0], [random_case(5000 + i, 1) for i in range(3)]),
    ]
    results = spawn(4, jobs, tmp_path)
    check_against_single_device(jobs, results)
    assert all(results[r][0, 10]["stats"].history == 0 for r in range(4))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cp2_nccl_matches_single_device(tmp_path):
    """The same exchange over NCCL (tensors on each rank's GPU)."""
    jobs = [([0, 1], [random_case(6000 + i, 2) for i in range(8)] + [none_case(2)])]
    check_against_single_device(jobs, spawn(2, jobs, tmp_path, timeout=300, backend="nccl"))


@pytest.mark.parametrize("seed", range(60))
def test_history_bytes_are_exactly_the_remote_keys_read(seed):
    """Brute force from the oracle's keys (tests/oracle.py): rank q sends each later rank exactly the keys q owns that it
    reads as history."""
    world = random.Random(seed).choice([2, 3, 4])
    c = random_case(seed, world)
    T, S, ranges = c["ranges"][-1][1], c["S"], c["ranges"]
    hist = torch.stack([oracle.masks(T, S, oracle.parse(p))[1] for p in c["policies"]])  # [Hkv, T, T]: history read
    read = [hist[:, lo:hi].any(1) for lo, hi in ranges]  # [Hkv, T]: keys some query of the rank reads as history
    per_key = c["B"] * (c["D"] + c["Dv"]) * 8
    want = []
    for q, (qlo, qhi) in enumerate(ranges):
        keys = sum(int(read[r][:, qlo : min(qhi, history_end(lo // S, S))].sum()) for r, (lo, _) in enumerate(ranges) if r > q)
        want.append(keys * per_key)
    formula = exchange_bytes(
        ranges, S, c["policies"], batch=c["B"], n_kv_heads=c["Hkv"], head_dim=c["D"], v_head_dim=c["Dv"], element_size=8
    )
    assert [f.history for f in formula] == want
    carry = per_key * c["Hkv"] * S
    assert [f.carry for f in formula] == [carry] * (world - 1) + [0]
    assert [f.carry_grad for f in formula] == [0] + [carry] * (world - 1)


def test_balanced_ranges():
    assert context_parallel_ranges(10, 2, 2) == [(0, 6), (6, 10)]
    assert context_parallel_ranges(13, 4, 2) == [(0, 8), (8, 13)]  # last rank ends in a partial segment
    assert context_parallel_ranges(7, 1, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert context_parallel_ranges(5, 8, 1) == [(0, 5)]
    for seed in range(200):
        rng = random.Random(seed)
        T, S, W = rng.randint(1, 100), rng.randint(1, 9), rng.randint(1, 5)
        try:
            ranges = context_parallel_ranges(T, S, W)
        except CPSplitError:
            assert (W - 1) * math.ceil(math.ceil(T / S) / W) * S >= T
            continue
        assert ranges[0][0] == 0 and ranges[-1][1] == T and len(ranges) == W
        assert shard_ranges([b - a for a, b in ranges], S) == ranges
        assert len({b - a for a, b in ranges[:-1]}) <= 1 and ranges[-1][1] - ranges[-1][0] <= ranges[0][1] - ranges[0][0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: context_parallel_ranges(4, 4, 2), "1 segment.*too few for context-parallel size 2"),
        (lambda: context_parallel_ranges(9, 2, 4), "5 segment.*leave rank 3 empty"),
        (lambda: context_parallel_ranges(0, 4, 2), "seq_len must be an integer >= 1"),
        (lambda: context_parallel_ranges(8, 4, 0), "world must be an integer >= 1"),
        (lambda: shard_ranges([4, 6, 3], 4), "rank 1 holds 6 tokens, not a multiple of segment_size=4"),
        (lambda: shard_ranges([4, 0, 3], 4), "rank 1 holds 0 tokens"),
        (lambda: shard_ranges([], 4), "no context-parallel ranks"),
    ],
)
def test_bad_splits_fail_clearly(call, match):
    with pytest.raises(CPSplitError, match=match):
        call()
