"""Every CPU-runnable path of segment attention against the independent brute force of ``tests/oracle.py``.

The shared float64 reference (``backend="reference"``) builds its masks from ``segtrain.policy``, as the backends,
context parallelism and the KV cache do, so it cannot catch a wrong policy. The oracle lists each query's keys from
DESIGN.md §1 alone. Cases have at least 4 segments, every policy kind and combination with edges inside history,
GQA, ``carry_grad`` either way and mostly a partial last segment; forward and gradients, history's exactly zero.
"""

import functools
import random

import oracle
import pytest
import torch
from spawned import cp_oracle_worker, spawn_workers

from segtrain.attention import filled_slots, segment_attention
from segtrain.attention.te import bottom_right_reference, reference_tiles, te_fp8_segment_attention, te_segment_attention
from segtrain.config import ModelConfig
from segtrain.inference import Block, SegmentedEngine
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import as_head_policies

CASES = [oracle.random_case(seed) for seed in range(24)]
FORWARD = dict(rtol=0, atol=1e-12)
GRADIENT = dict(rtol=0, atol=1e-11)


def _segment_attention(backend):
    return lambda q, k, v, c: segment_attention(
        q, k, v, segment_size=c["S"], policy=c["policies"], backend=backend, carry_grad=c["carry_grad"]
    )


def _te(q, k, v, c):
    return te_segment_attention(q, k, v, c["S"], as_head_policies(c["policies"], c["Hkv"]), c["D"] ** -0.5, c["carry_grad"],
                                kernel=bottom_right_reference)  # fmt: skip


def _te_fp8(q, k, v, c):
    return te_fp8_segment_attention(q, k, v, c["S"], as_head_policies(c["policies"], c["Hkv"]), c["D"] ** -0.5,
                                    c["carry_grad"], kernels=reference_tiles)  # fmt: skip


# the te decompositions run with plain-PyTorch kernels in Transformer Engine's place (what runs on a CPU)
TRAINABLE = {"reference": _segment_attention("reference"), "math": _segment_attention("math"), "te": _te, "te-fp8": _te_fp8}


def oracle_and_grads(c, seed):
    q, k, v, w = oracle.make_qkv(c, seed)
    want = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=c["carry_grad"])
    return (q, k, v, w), want, torch.autograd.grad((want * w).sum(), (q, k, v))


# ---- the oracle itself ----------------------------------------------------------------------------------------------


def test_oracle_lists_the_keys_of_design_by_hand():
    """S=4, a query at t=17 (segment 4): own segment [16, 17], previous [12, 16), history [0, 12)."""
    own, previous = [16, 17], [12, 13, 14, 15]
    sink2_window3 = oracle.parse("sink:2+window:3")
    assert oracle.visible_keys(17, 4, sink2_window3) == (previous + own, [0, 1, 9, 10, 11])
    assert oracle.visible_keys(17, 4, oracle.parse("none")) == (previous + own, [])
    assert oracle.visible_keys(17, 4, oracle.parse("all")) == (previous + own, list(range(12)))
    assert oracle.visible_keys(17, 4, oracle.parse("window:20")) == (previous + own, list(range(12)))
    assert oracle.visible_keys(17, 4, oracle.parse("window:3+sink:10")) == (previous + own, list(range(12)))
    assert oracle.visible_keys(17, 4, oracle.parse("all+window:1")) == (previous + own, list(range(12)))
    assert oracle.visible_keys(17, 4, sink2_window3, carry_grad=False) == (own, [0, 1, 9, 10, 11] + previous)
    assert oracle.visible_keys(5, 4, oracle.parse("all")) == ([0, 1, 2, 3, 4, 5], [])  # segment 1: no history
    assert oracle.readable_keys(17, 4, sink2_window3) == [0, 1, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    with pytest.raises(ValueError, match="windo:3"):
        oracle.parse("sink:1+windo:3")


def test_oracle_equals_a_softmax_over_each_querys_listed_keys():
    """The oracle's masked arithmetic (GQA, detach) against one softmax per query row over the keys it lists."""
    c = dict(B=2, Hq=4, Hkv=2, T=17, S=4, D=4, policies=["sink:2+window:3", "window:5"], carry_grad=False)
    q, k, v, w = oracle.make_qkv(c, seed=0)
    got = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=False)
    rows = torch.zeros_like(got)
    for h in range(4):
        for t in range(17):
            live, past = oracle.visible_keys(t, 4, oracle.parse(c["policies"][h // 2]), carry_grad=False)
            keys = torch.cat([k[:, h // 2, live], k.detach()[:, h // 2, past]], 1)
            values = torch.cat([v[:, h // 2, live], v.detach()[:, h // 2, past]], 1)
            weights = torch.softmax(torch.einsum("bd,bnd->bn", q[:, h, t], keys) / 2, -1)
            rows[:, h, t] = torch.einsum("bn,bnd->bd", weights, values)
    torch.testing.assert_close(got, rows, **FORWARD)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((rows * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **GRADIENT)


def test_cases_cover_every_policy_kind_and_edge_inside_history():
    """The case list is not allowed to drift into cases that cannot tell policies apart."""
    kinds, edges = set(), set()
    for c in CASES:
        assert c["T"] >= 3 * c["S"] + 1, c  # at least 4 segments
        last_history_end = (((c["T"] - 1) // c["S"]) - 1) * c["S"]
        for text in c["policies"]:
            p = oracle.parse(text)
            kinds.add(text.split(":")[0] if "+" not in text else "+".join(sorted(t.split(":")[0] for t in text.split("+"))))
            if p.sink and not p.all and p.sink < last_history_end:
                edges.add("sink")
            if p.window and not p.all and last_history_end - p.window > 0:
                edges.add("window")
    assert kinds >= {"none", "all", "sink", "window", "sink+window", "all+window"}, kinds
    assert edges == {"sink", "window"}
    assert {c["carry_grad"] for c in CASES} == {True, False}
    assert any(c["T"] % c["S"] for c in CASES) and any(c["Hq"] > c["Hkv"] for c in CASES)


# ---- single-device backends -----------------------------------------------------------------------------------------


@functools.cache
def oracle_case(seed):
    """The oracle's output and gradients of ``CASES[seed]`` (computed once for every backend)."""
    _, want, want_grads = oracle_and_grads(CASES[seed], seed)
    return want.detach(), want_grads


@pytest.mark.parametrize("seed", range(len(CASES)))
@pytest.mark.parametrize("backend", TRAINABLE)
def test_every_trainable_backend_matches_the_oracle(seed, backend):
    c = CASES[seed]
    want, want_grads = oracle_case(seed)
    q, k, v, w = oracle.make_qkv(c, seed)
    got = TRAINABLE[backend](q, k, v, c)
    torch.testing.assert_close(got, want, **FORWARD, msg=lambda m: f"forward, {c}: {m}")
    for x, a, b in zip("qkv", torch.autograd.grad((got * w).sum(), (q, k, v)), want_grads):
        torch.testing.assert_close(a, b, **GRADIENT, msg=lambda m, x=x: f"d{x}, {c}: {m}")


@pytest.mark.parametrize("seed", range(0, len(CASES), 3))
def test_flex_forward_on_cpu_matches_the_oracle(seed):
    c = CASES[seed]
    q, k, v, _ = oracle.make_qkv(c, seed, requires_grad=False)
    want = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=c["carry_grad"])
    got = _segment_attention("flex")(q, k, v, c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("carry_grad", [True, False])
def test_history_gets_exactly_zero_gradient_and_still_shapes_dq(carry_grad):
    """Loss on the last segment only: every key before its previous segment (and the previous segment too without
    ``carry_grad``) gets exactly zero dK and dV in every backend; the oracle agrees, and dQ differs from ``none``."""
    c = dict(B=1, Hq=4, Hkv=2, T=30, S=6, D=8, policies=["all", "sink:3+window:5"], carry_grad=carry_grad)
    q, k, v, _ = oracle.make_qkv(c, seed=3)
    frozen = 18 if carry_grad else 24  # last segment [24, 30): previous [18, 24), history [0, 18)
    without_history = oracle.attention(q, k, v, c["S"], "none", carry_grad=carry_grad)
    dq_none = torch.autograd.grad(without_history[:, :, 24:].square().sum(), q)[0]
    runs = {"oracle": lambda q, k, v, c: oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=carry_grad), **TRAINABLE}
    for name, run in runs.items():
        dq, dk, dv = torch.autograd.grad(run(q, k, v, c)[:, :, 24:].square().sum(), (q, k, v))
        assert torch.count_nonzero(dk[:, :, :frozen]) == 0 and torch.count_nonzero(dv[:, :, :frozen]) == 0, name
        assert dk[:, :, frozen:29].abs().min() > 0 and dv[:, :, frozen:].abs().min() > 0, name
        assert (dq[:, :, 24:] - dq_none[:, :, 24:]).abs().max() > 1e-3, f"{name}: history does not reach dQ"


# ---- context parallelism (gloo) -------------------------------------------------------------------------------------


def cp_cases(world: int, n: int) -> list[dict]:
    """Oracle cases split over ``world`` ranks in runs of whole segments (uneven; the last rank's may end mid-segment)."""
    cases = []
    for seed in range(n):
        rng = random.Random(seed)
        c = {**oracle.random_case(1000 + seed), "carry_grad": True}  # CP always carries the gradient
        n_segments = -(-c["T"] // c["S"])
        cuts = sorted(rng.sample(range(1, n_segments), world - 1))
        bounds = [0] + [cut * c["S"] for cut in cuts] + [c["T"]]
        cases.append({**c, "ranges": list(zip(bounds[:-1], bounds[1:]))})
    return cases


@pytest.mark.slow
def test_context_parallel_on_gloo_matches_the_oracle(tmp_path):
    """CP=3: the middle rank both receives history and sends it; sinks and windows cross rank boundaries."""
    cases = cp_cases(3, 6)
    assert any(oracle.parse(p).sink or oracle.parse(p).window for c in cases for p in c["policies"])
    shards = spawn_workers(cp_oracle_worker, 3, (cases, None), tmp_path, timeout=120)
    for i, c in enumerate(cases):
        (q, k, v, w), want, want_grads = oracle_and_grads(c, i)
        for j, (name, expected) in enumerate(zip(("out", "dq", "dk", "dv"), [want, *want_grads])):
            got = torch.cat([shard[i][j] for shard in shards], dim=2)
            torch.testing.assert_close(got, expected, **GRADIENT, msg=lambda m, n=name, c=c: f"CP {n}, {c}: {m}")


# ---- the inference cache and engine ---------------------------------------------------------------------------------


class OracleSlot(torch.nn.Module):
    """Fills a layer's attention slot with the oracle, reading the policy strings the model was configured with."""

    def __init__(self, segment_size: int, policies: list[str], scale: float | None):
        super().__init__()
        self.segment_size, self.policies, self.scale = segment_size, policies, scale

    def forward(self, q, k, v):
        return oracle.attention(q, k, v, self.segment_size, self.policies, self.scale)


def oracle_model(seed: int):
    """A random float64 model with 2 layers, GQA and random policies per (layer, KV head); and those policy strings."""
    rng = random.Random(seed)
    S, kv, T = rng.choice([2, 3, 4]), rng.choice([2, 3]), 26  # 26 tokens: at least 6 segments, the last partial
    policies = [[oracle.random_policy(rng, S, T) for _ in range(kv)] for _ in range(2)]
    config = ModelConfig(vocab_size=41, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=2 * kv,
                         num_kv_heads=kv, head_dim=8, segment_size=S, history_policy=policies, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double().eval(), policies


def oracle_logits(model, policies, ids):
    make = lambda slot: OracleSlot(slot.segment_size, policies[slot.layer], slot.scale)
    with torch.no_grad(), filled_slots(model, make):
        return model(torch.as_tensor([ids]))[0]


INFERENCE = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_inference_prefill_and_decoding_match_the_oracle(seed):
    """Prefill (every block layout) and greedy decoding across many segment boundaries give the oracle's logits."""
    model, policies = oracle_model(seed)
    rng = random.Random(seed)
    ids = [rng.randrange(41) for _ in range(17)]
    want = oracle_logits(model, policies, ids)
    for kwargs in (dict(), dict(prefill_chunk=2), dict(sdpa_prefill=True), dict(offload_history=True)):
        engine = SegmentedEngine(model, **kwargs)
        got = engine.prefill(engine.new_cache(1, len(ids)), [ids], all_logits=True)[0]
        torch.testing.assert_close(got, want, **INFERENCE, msg=lambda m, kw=kwargs: f"prefill {kw}, {policies}: {m}")
    out = SegmentedEngine(model, offload_history=seed == 1).generate([ids, ids[:5]], max_new_tokens=9, return_logits=True)
    for row, prompt in enumerate([ids, ids[:5]]):
        # the model is causal: one oracle pass over the grown sequence gives the logits every step saw
        expected = oracle_logits(model, policies, prompt + out.tokens[row][:-1])[len(prompt) - 1 :]
        got = torch.stack([logits[row] for logits in out.step_logits])
        torch.testing.assert_close(got, expected, **INFERENCE, msg=lambda m: f"decoding, {policies}: {m}")
        assert out.tokens[row] == expected.argmax(-1).tolist()


@pytest.mark.parametrize("offload", [False, True])
def test_cache_holds_exactly_the_keys_the_oracle_says_are_still_read(offload):
    """After each token: per (layer, KV head), the readable cache positions are the keys some query of the current
    segment (now or later) sees: nothing evicted early, nothing kept that no query reads."""
    model, policies = oracle_model(7)
    S = model.config.segment_size
    engine = SegmentedEngine(model, offload_history=offload)
    ids = torch.randint(0, 41, (1, 26), generator=torch.Generator().manual_seed(0))
    cache = engine.new_cache(1, 26)
    for t in range(26):
        engine.step(cache, ids[:, t : t + 1], Block((t,), (1,)))
        for layer, row in enumerate(policies):
            for h, text in enumerate(row):
                want = oracle.readable_keys(t, S, oracle.parse(text))
                assert cache.held_positions(layer, h, 0) == want, (t, layer, h, text, S)
