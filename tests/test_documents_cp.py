"""Document mode under context parallelism on gloo (spawned CPU processes, float64) against the independent oracle.

The segment loop (forward and gradients) and the one-call flex form (forward; CPU FlexAttention has no backward).
Documents span rank boundaries (one spans three ranks), start inside segments, are shorter than a segment, and a
rank may start exactly at a document; rows of a batch have different layouts; ranks hold uneven runs of segments,
down to one. Forward and the gradients into every rank's q, k, v (so the carried keys' gradient returns to the
ranks that own them, and history gets none).
"""

import random

import oracle
import pytest
import torch
from spawned import cp_oracle_worker, spawn_workers

GRADIENT = dict(rtol=0, atol=1e-11)


def cp_document_cases(world: int, n: int) -> list[dict]:
    cases = []
    for seed in range(n):
        rng = random.Random(seed)
        c = {**oracle.random_case(2000 + seed, max_segments=9), "carry_grad": True}
        n_segments = -(-c["T"] // c["S"])
        cuts = sorted(rng.sample(range(1, n_segments), world - 1))
        bounds = [0] + [cut * c["S"] for cut in cuts] + [c["T"]]
        rows = [oracle.random_documents(rng, c["T"], c["S"]) for _ in range(c["B"])]
        rows[0] = list(range(bounds[1] + 1)) + list(range(c["T"] - bounds[1] - 1))  # spans ranks 0 and 1 (and on)
        cases.append({**c, "ranges": list(zip(bounds[:-1], bounds[1:])), "positions": rows})
    return cases


def _ranks_spanned(c: dict) -> int:
    """The most ranks one document of the case touches."""
    most = 0
    for row in c["positions"]:
        starts = [t for t, p in enumerate(row) if p == 0] + [len(row)]
        for a, e in zip(starts, starts[1:]):
            most = max(most, sum(1 for lo, hi in c["ranges"] if lo < e and a < hi))
    return most


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_context_parallel_documents_match_the_oracle(tmp_path, world):
    cases = cp_document_cases(world, 8)
    assert max(_ranks_spanned(c) for c in cases) >= 3
    assert any(row[lo] == 0 for c in cases for row in c["positions"] for lo, _ in c["ranges"][1:])
    shards = spawn_workers(cp_oracle_worker, world, (cases, "math"), tmp_path, timeout=180)
    for i, c in enumerate(cases):
        q, k, v, w = oracle.make_qkv(c, i)
        want = oracle.attention(q, k, v, c["S"], c["policies"], positions=c["positions"])
        grads = torch.autograd.grad((want * w).sum(), (q, k, v))
        for j, (name, expected) in enumerate(zip(("out", "dq", "dk", "dv"), [want, *grads])):
            got = torch.cat([shard[i][j] for shard in shards], dim=2)
            torch.testing.assert_close(got, expected.detach(), **GRADIENT, msg=lambda m, n=name, c=c: f"CP {n}, {c}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_context_parallel_documents_in_one_flex_call_match_the_oracle(tmp_path, world):
    """The flex form (documents in the mask of one FlexAttention call per rank) on CPU: forward, float64, against the
    oracle (the segment loop's twin test above checks gradients too; CPU FlexAttention has no backward)."""
    cases = cp_document_cases(world, 8)
    shards = spawn_workers(cp_oracle_worker, world, (cases, "flex"), tmp_path, timeout=180)
    for i, c in enumerate(cases):
        q, k, v, _ = oracle.make_qkv(c, i, requires_grad=False)
        want = oracle.attention(q, k, v, c["S"], c["policies"], positions=c["positions"])
        got = torch.cat([shard[i][0] for shard in shards], dim=2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m, c=c: f"CP flex out, {c}: {m}")
