"""Compiled FlexAttention kernels (real block sparsity) against the float64 reference, on the GPU."""

import pytest
import torch
from attention_cases import make_qkv

from segtrain.attention import resolve_backend, segment_attention
from segtrain.attention.flex import flash_available

pytestmark = pytest.mark.gpu

CASES = [  # (B, Hq, Hkv, T, S, D, policies)
    (2, 4, 2, 384, 128, 64, ["all", "sink:4+window:100"]),
    (1, 6, 3, 517, 100, 32, ["none", "window:300", "all"]),  # partial blocks, S not a multiple of 128
    (1, 8, 2, 1024, 256, 128, ["sink:130", "all"]),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES)
def test_flex_matches_reference_forward_and_backward(case, dtype, tol):
    B, Hq, Hkv, T, S, D, policies = case
    q, k, v = make_qkv(B, Hq, Hkv, T, D, device="cuda", seed=T)
    ref = segment_attention(q, k, v, segment_size=S, policy=policies, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = segment_attention(ql, kl, vl, segment_size=S, policy=policies, backend="flex")
    grads = torch.autograd.grad(out, (ql, kl, vl), g.to(dtype), retain_graph=True)
    assert rel(out, ref) < tol
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel(a, b) < tol, name
    # stop-gradient: with the loss on the last segment only, every key before its previous segment is read as history
    # only, and gets exactly zero dK and dV; the previous segment's keys get gradient
    last = (T - 1) // S * S
    dk, dv = torch.autograd.grad(out[:, :, last:].float().square().sum(), (kl, vl))
    assert torch.count_nonzero(dk[:, :, : last - S]) == 0 and torch.count_nonzero(dv[:, :, : last - S]) == 0
    assert torch.count_nonzero(dk[:, :, last - S : last]) > 0


def test_flex_history_gradient_is_exactly_zero_on_gpu():
    S, T = 128, 512  # loss on the last segment: history [0, 256), previous segment [256, 384)
    q, k, v = make_qkv(1, 4, 2, T, 64, dtype=torch.bfloat16, device="cuda", seed=9)
    out = segment_attention(q, k, v, segment_size=S, policy=["all", "sink:3+window:50"], backend="flex")
    dk, dv = torch.autograd.grad(out[:, :, 384:].float().square().sum(), (k, v))
    assert torch.count_nonzero(dk[:, :, :256]) == 0 and torch.count_nonzero(dv[:, :, :256]) == 0
    assert torch.count_nonzero(dk[:, :, 256:384]) > 0


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_without_carry_grad_flex_matches_reference_and_stops_the_gradient(backend):
    if backend == "flash" and not flash_available(torch.device("cuda")):
        pytest.skip("flash-attn-4 is not installed")
    B, Hq, Hkv, T, S, D, policies = 1, 4, 2, 640, 128, 64, ["all", "sink:3+window:50"]
    q, k, v = make_qkv(B, Hq, Hkv, T, D, device="cuda", seed=11)
    ref = segment_attention(q, k, v, segment_size=S, policy=policies, backend="reference", carry_grad=False)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    ql, kl, vl = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = segment_attention(ql, kl, vl, segment_size=S, policy=policies, backend=backend, carry_grad=False)
    grads = torch.autograd.grad(out, (ql, kl, vl), g.bfloat16())
    assert rel(out, ref) < 2e-2
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel(a, b) < 2e-2, name
    dk = torch.autograd.grad(
        segment_attention(ql, kl, vl, segment_size=S, policy=policies, backend=backend, carry_grad=False)[:, :, 512:]
        .float()
        .square()
        .sum(),
        kl,
    )[0]
    assert torch.count_nonzero(dk[:, :, :512]) == 0 and torch.count_nonzero(dk[:, :, 512:]) > 0


def test_flex_at_long_length_matches_math():
    """T=16K, S=1K: thousands of skipped blocks; compare with the math backend in float32.

    The float32 math reference keeps every segment's scores for backward (tens of GB at 16K for all heads at once),
    so it runs one KV head group at a time: each group's policy is its own, so the slices are independent."""
    q, k, v = make_qkv(1, 8, 4, 16384, 64, dtype=torch.bfloat16, device="cuda", seed=11)
    policies = ["all", "none", "sink:64+window:512", "none"]
    out = segment_attention(q, k, v, segment_size=1024, policy=policies, backend="flex")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    group = q.shape[1] // k.shape[1]
    for h, policy in enumerate(policies):
        qs, ks = slice(h * group, (h + 1) * group), slice(h, h + 1)
        q32, k32, v32 = (t[:, s].detach().float().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        ref = segment_attention(q32, k32, v32, segment_size=1024, policy=[policy], backend="math")
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g[:, qs].float())
        assert rel(out[:, qs], ref) < 2e-2, policy
        for name, a, b, s in zip("qkv", grads, ref_grads, (qs, ks, ks)):
            assert rel(a[:, s], b) < 2e-2, (policy, name)
        del ref, ref_grads, q32, k32, v32
    print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")


@pytest.mark.parametrize("case", CASES)
def test_flash_kernels_match_reference(case):
    """backend='flash': the same mask run by flash-attn-4 through FlexAttention (Hopper+)."""
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed on this GPU machine")
    B, Hq, Hkv, T, S, D, policies = case
    q, k, v = make_qkv(B, Hq, Hkv, T, D, device="cuda", seed=T)
    ref = segment_attention(q, k, v, segment_size=S, policy=policies, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    ql, kl, vl = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = segment_attention(ql, kl, vl, segment_size=S, policy=policies, backend="flash")
    grads = torch.autograd.grad(out, (ql, kl, vl), g.bfloat16())
    assert rel(out, ref) < 2e-2
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel(a, b) < 2e-2, name


def test_auto_picks_fused_kernels_on_cuda():
    q = torch.randn(1, 1, 4, 4, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == ("flash" if flash_available(q.device) else "flex")
    assert resolve_backend("auto", q.float()) == "flex"
    assert resolve_backend("auto", q.double()) == "math"


def test_flex_stays_compiled_past_dynamos_recompile_limit():
    """Each new shape recompiles the flex call; past Dynamo's default limit (8) it would run eager FlexAttention, which
    is dense. After a dozen shapes, a 8K call's forward and backward still hold far less than its dense scores."""
    for i in range(12):
        q, k, v = make_qkv(1, 4, 2, 256 + 64 * i, 64, dtype=torch.bfloat16, device="cuda", seed=i)
        out = segment_attention(q, k, v, segment_size=128, policy=["all", "none"], backend="flex")
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    q, k, v = make_qkv(1, 8, 4, 8192, 64, dtype=torch.bfloat16, device="cuda", seed=99)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = segment_attention(q, k, v, segment_size=1024, policy=["all", "none", "sink:64", "none"], backend="flex")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    dense_scores = 8 * 8192 * 2 * 8192 * 4  # heads x queries x keys (own and history copies) x float32
    assert torch.cuda.max_memory_allocated() - before < dense_scores / 8
