import math

import pytest
import torch
from attention_cases import brute_force, dense_blocks, make_qkv, random_case

from segtrain.attention import merge_partials, resolve_backend, segment_attention, segment_block_attention
from segtrain.attention.flex import BLOCK, segment_block_mask
from segtrain.attention.reference import visibility_masks
from segtrain.policy import HeadPolicy, PolicyError, history_end


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_brute_force(seed):
    c = random_case(seed, max_t=20)
    q, k, v = make_qkv(c["B"], c["Hq"], c["Hkv"], c["T"], c["D"], seed=seed)
    scale = 1 / math.sqrt(c["D"])
    want = brute_force(q, k, v, c["S"], c["policies"], scale)
    got = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(40))
def test_math_matches_reference_float64(seed):
    c = random_case(100 + seed)
    q, k, v = make_qkv(c["B"], c["Hq"], c["Hkv"], c["T"], c["D"], seed=seed)
    ref = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="reference")
    out = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="math")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(8))
def test_without_carry_grad_every_backend_matches_brute_force(seed):
    """``carry_grad=False`` (the stop-gradient ablation): the same forward, no gradient into the previous segment's K/V."""
    c = random_case(300 + seed, max_t=24)
    q, k, v = make_qkv(c["B"], c["Hq"], c["Hkv"], c["T"], c["D"], seed=seed)
    scale = 1 / math.sqrt(c["D"])
    want = brute_force(q, k, v, c["S"], c["policies"], scale, carry_grad=False)
    want_grads = grads(want, (q, k, v))
    with_carry = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="reference")
    for backend in ("reference", "math"):
        got = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend=backend, carry_grad=False)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(got, with_carry, atol=1e-12, rtol=0)
        for a, b in zip(grads(got, (q, k, v)), want_grads):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with torch.no_grad():
        flex = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="flex", carry_grad=False)
    torch.testing.assert_close(flex, want.detach(), atol=1e-6, rtol=0)


def test_without_carry_grad_the_previous_segment_gets_no_gradient():
    S, T = 8, 32  # loss on segment 3 only: previous segment [16, 24); its own keys [24, 32) still get gradient
    q, k, v = make_qkv(2, 4, 2, T, 8, seed=6)
    for backend in ("reference", "math"):
        out = segment_attention(q, k, v, segment_size=S, policy=["all", "none"], backend=backend, carry_grad=False)
        dq, dk, dv = torch.autograd.grad(out[:, :, 24:].square().sum(), (q, k, v))
        assert torch.count_nonzero(dk[:, :, :24]) == 0 and torch.count_nonzero(dv[:, :, :24]) == 0, backend
        assert dk[:, :, 24:31].abs().min() > 0 and dv[:, :, 24:].abs().min() > 0, backend


@pytest.mark.parametrize("seed", range(12))
def test_flex_forward_matches_reference_float64(seed):
    c = random_case(200 + seed, max_t=300)
    q, k, v = make_qkv(c["B"], c["Hq"], c["Hkv"], c["T"], c["D"], seed=seed, requires_grad=False)
    ref = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="reference")
    out = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("carry_grad", [True, False])
@pytest.mark.parametrize("T, S", [(512, 128), (768, 256), (512, 100), (640, 300), (384, 1000), (512, 1)])
def test_flex_block_lists_cover_exactly_the_visible_keys(T, S, carry_grad):
    """Full blocks are all-visible; every block with a visible key is listed; with S % 128 == 0 no block is listed in vain."""
    policies = tuple(HeadPolicy.parse(p) for p in ["all", "none", "sink:5", "window:200", "sink:130+window:1"])
    bm = segment_block_mask(T, S, policies, 2, "cpu", carry_grad)
    live, hist = visibility_masks(T, S, policies)
    if not carry_grad:  # the previous segment moves to the detached half
        segment = torch.arange(T) // S
        previous = live & (segment[:, None] != segment[None, :])
        live, hist = live & ~previous, hist | previous
    mask = torch.cat([live.expand_as(hist), hist], -1).repeat_interleave(2, 0)  # [Hq, T, 2T]
    blocks = mask.view(mask.shape[0], T // BLOCK, BLOCK, 2 * T // BLOCK, BLOCK)
    any_visible, all_visible = blocks.any(4).any(2), blocks.all(4).all(2)
    n_kv = 2 * T // BLOCK
    full = dense_blocks(bm.full_kv_num_blocks[0], bm.full_kv_indices[0], n_kv)
    partial = dense_blocks(bm.kv_num_blocks[0], bm.kv_indices[0], n_kv)
    assert not (full & partial).any()
    assert torch.equal(full & all_visible, full), "a block marked full has an invisible key"
    assert torch.equal((full | partial) & any_visible, any_visible), "a block with visible keys is not listed"
    if S % BLOCK == 0:
        assert torch.equal(full, all_visible) and torch.equal(partial, any_visible & ~all_visible)


def test_history_gets_no_gradient_previous_segment_does():
    S, T = 8, 32  # loss on segment 3 only: history is [0, 16), previous segment [16, 24)
    q, k, v = make_qkv(2, 4, 2, T, 8, seed=3)
    policies = ["all", "sink:2+window:5"]
    for backend in ["reference", "math"]:
        out = segment_attention(q, k, v, segment_size=S, policy=policies, backend=backend)
        dq, dk, dv = torch.autograd.grad(out[:, :, 24:].square().sum(), (q, k, v))
        assert torch.count_nonzero(dk[:, :, :16]) == 0 and torch.count_nonzero(dv[:, :, :16]) == 0, backend
        assert dk[:, :, 16:24].abs().min() > 0 and dv[:, :, 16:24].abs().min() > 0, backend
        no_history = segment_attention(q, k, v, segment_size=S, policy="none", backend=backend)
        dq0 = torch.autograd.grad(no_history[:, :, 24:].square().sum(), q)[0]
        assert (dq - dq0).abs().max() > 1e-3, f"{backend}: history does not reach dQ"


def test_history_changes_the_output_only_where_the_policy_reads():
    S, T = 8, 40
    q, k, v = make_qkv(1, 2, 2, T, 8, seed=4, requires_grad=False)
    base = segment_attention(q, k, v, segment_size=S, policy="none", backend="math")
    out = segment_attention(q, k, v, segment_size=S, policy=["none", "all"], backend="math")
    assert torch.equal(out[:, 0], base[:, 0])  # head 0 reads no history
    assert torch.equal(out[:, 1, :16], base[:, 1, :16])  # segments 0 and 1 have no history
    assert (out[:, 1, 16:] - base[:, 1, 16:]).abs().min() > 0


@pytest.mark.parametrize("backend", ["reference", "math"])
def test_rows_without_history_are_finite(backend):
    q, k, v = make_qkv(1, 3, 3, 33, 4, seed=5)
    out = segment_attention(q, k, v, segment_size=4, policy=["none", "sink:1", "window:2"], backend=backend)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)))


def test_bfloat16_math_close_to_float64():
    c = dict(B=1, Hq=4, Hkv=2, T=96, D=16)
    q, k, v = make_qkv(**c, seed=6, requires_grad=False)
    ref = segment_attention(q, k, v, segment_size=16, policy=["all", "window:8"], backend="reference")
    out = segment_attention(*(t.bfloat16() for t in (q, k, v)), segment_size=16, policy=["all", "window:8"], backend="math")
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_block_entry_batches_sequences_at_different_offsets():
    """Two sequences decoding at different positions, one with empty cache slots, in one call."""
    S, D = 8, 8
    policies = [HeadPolicy(all=True), HeadPolicy(sink=2, window=3)]
    q, k, v = make_qkv(2, 4, 2, 40, D, seed=7, requires_grad=False)
    ref = segment_attention(q, k, v, segment_size=S, policy=policies, backend="reference")
    t0, t1 = 37, 21  # one query per sequence, in segments 4 and 2
    width_local, width_hist = 2 * S, 32
    q_blk = torch.stack([q[0, :, t0 : t0 + 1], q[1, :, t1 : t1 + 1]])
    k_loc, v_loc = torch.zeros(2, 2, width_local, D, dtype=q.dtype), torch.zeros(2, 2, width_local, D, dtype=q.dtype)
    local_pos = torch.full((2, width_local), -1)
    k_hist, v_hist = torch.zeros(2, 2, width_hist, D, dtype=q.dtype), torch.zeros(2, 2, width_hist, D, dtype=q.dtype)
    valid = torch.zeros(2, 2, width_hist, dtype=torch.bool)
    for b, t in enumerate((t0, t1)):
        end = history_end(t // S, S)
        n = t + 1 - end
        k_loc[b, :, :n], v_loc[b, :, :n], local_pos[b, :n] = k[b, :, end : t + 1], v[b, :, end : t + 1], torch.arange(end, t + 1)
        for h, p in enumerate(policies):
            keys = [j for lo, hi in p.history_ranges(end) for j in range(lo, hi)]
            k_hist[b, h, : len(keys)], v_hist[b, h, : len(keys)] = k[b, h, keys], v[b, h, keys]
            valid[b, h, : len(keys)] = True
    k_loc.masked_fill_((local_pos < 0)[:, None, :, None], 1e3)  # junk in empty slots must not leak
    out, lse = segment_block_attention(
        q_blk,
        k_loc,
        v_loc,
        k_hist,
        v_hist,
        q_positions=torch.tensor([[t0], [t1]]),
        local_positions=local_pos,
        history_valid=valid,
    )
    torch.testing.assert_close(out[0, :, 0], ref[0, :, t0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out[1, :, 0], ref[1, :, t1], atol=1e-10, rtol=0)
    assert torch.isfinite(lse).all()


def test_merge_partials_is_exact_and_safe_on_empty_parts():
    q, k, v = make_qkv(1, 2, 2, 12, 4, seed=8)
    pos = torch.arange(12)
    whole, lse = segment_block_attention(q, k, v, q_positions=pos, local_positions=pos, scale=0.5)
    first = torch.where(pos < 5, pos, torch.full_like(pos, -1))
    rest = torch.where(pos >= 5, pos, torch.full_like(pos, -1))
    o1, l1 = segment_block_attention(q, k, v, q_positions=pos, local_positions=first, scale=0.5)
    o2, l2 = segment_block_attention(q, k, v, q_positions=pos, local_positions=rest, scale=0.5)
    assert torch.isinf(l2[..., :5]).all()  # queries 0..4 see nothing in the second part
    merged, lse_m = merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(merged, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse_m, lse, atol=1e-12, rtol=0)
    for a, b in zip(grads(merged, (q, k, v)), grads(whole, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    empty, lse_e = merge_partials(o2[..., :5, :], l2[..., :5], o2[..., :5, :], l2[..., :5])
    assert torch.equal(empty, torch.zeros_like(empty)) and torch.isinf(lse_e).all()


def test_auto_picks_math_on_cpu():
    q, _, _ = make_qkv(1, 1, 1, 4, 4, requires_grad=False)
    assert resolve_backend("auto", q) == "math"


@pytest.mark.parametrize(
    "shapes, kwargs, error, match",
    [
        (((1, 4, 8, 4), (1, 3, 8, 4), (1, 3, 8, 4)), dict(segment_size=4, policy="all"), ValueError, "4 heads and k has 3"),
        (((1, 4, 8, 4), (1, 2, 9, 4), (1, 2, 9, 4)), dict(segment_size=4, policy="all"), ValueError, "agree in batch and length"),
        (((1, 4, 8), (1, 2, 8, 4), (1, 2, 8, 4)), dict(segment_size=4, policy="all"), ValueError, r"q must be \[B, H, T, D\]"),
        (((1, 4, 8, 4), (1, 2, 8, 5), (1, 2, 8, 4)), dict(segment_size=4, policy="all"), ValueError, "head dims differ"),
        (((1, 2, 8, 4),) * 3, dict(segment_size=0, policy="all"), ValueError, "segment_size must be an integer >= 1, got 0"),
        (((1, 2, 8, 4),) * 3, dict(segment_size=2.5, policy="all"), ValueError, "segment_size"),
        (((1, 2, 8, 4),) * 3, dict(segment_size=4, policy=["all"] * 3), PolicyError, "3 entries for 2 KV heads"),
        (((1, 2, 8, 4),) * 3, dict(segment_size=4, policy=["all", "windo:3"]), PolicyError, "windo:3"),
        (((1, 2, 8, 4),) * 3, dict(segment_size=4, policy="all", backend="fast"), ValueError, "unknown attention backend 'fast'"),
    ],
)
def test_bad_inputs_fail_clearly(shapes, kwargs, error, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(error, match=match):
        segment_attention(q, k, v, **kwargs)


def test_flex_on_cpu_refuses_backward_clearly():
    q, k, v = make_qkv(1, 1, 1, 8, 4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="backend='math'"):
        segment_attention(q, k, v, segment_size=4, policy="all", backend="flex")


def test_attention_slots_fill_and_restore():
    """One slot per layer: filling replaces every layer's attention, leaving the block (or restore_slots) puts it back."""
    from torch import nn

    from segtrain.attention import SegmentAttention, attention_slots, fill_slots, filled_slots, restore_slots
    from segtrain.config import load_model_config
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny")
    model = LlamaForCausalLM(config).double()
    slots = attention_slots(model)
    assert [s.layer for _, s in slots] == list(range(config.num_layers))
    assert all(isinstance(s, SegmentAttention) and s.policy == config.policy_table()[s.layer] for _, s in slots)

    class Zero(nn.Module):
        def forward(self, q, k, v):
            return torch.zeros_like(q)

    ids = torch.randint(0, config.vocab_size, (1, 40))
    before = model(ids)
    with filled_slots(model, lambda slot: Zero()):
        assert all(isinstance(owner.core_attention, Zero) for owner, _ in attention_slots(model))
        assert not torch.equal(model(ids), before)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    fill_slots(model, lambda slot: Zero())
    assert [s.layer for _, s in attention_slots(model)] == list(range(config.num_layers))  # originals still found
    restore_slots(model)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    with pytest.raises(TypeError, match="no attention slot"):
        attention_slots(nn.Linear(2, 2))
