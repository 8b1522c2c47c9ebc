"""The split-KV decoding kernel (``segtrain.kernels.decode_attention``) against an independent float64 oracle.

On a CUDA machine the cases run compiled. On CPU they run in Triton's interpreter, which has to be switched on
before Triton is first imported: ``test_in_the_triton_interpreter`` reruns this file in a child process with
``TRITON_INTERPRET=1``. The interpreter's bf16 ``tl.dot`` is wrong (Triton 3.6), so bf16 runs only on the GPU.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from segtrain.config import ModelConfig  # noqa: E402
from segtrain.errors import UserError  # noqa: E402
from segtrain.inference import Block, SegmentedEngine, SegmentKVCache, store_slots  # noqa: E402
from segtrain.kernels.decode_attention import BLOCK_N, ENV, Launch, decode_attention, default_launch, split_size  # noqa: E402
from segtrain.models.llama import LlamaForCausalLM  # noqa: E402
from segtrain.policy import HeadPolicy, PolicyTable, history_end  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
kernel_case = pytest.mark.skipif(not (INTERPRETED or CUDA), reason="runs in test_in_the_triton_interpreter's child process")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
POOL = ["none", "all", "sink:1", "sink:3", "window:2", "window:7", "sink:2+window:3", "sink:9+window:1"]

if INTERPRETED:
    from segtrain.compat.triton import patch_interpreter_scalars

    patch_interpreter_scalars()


def test_in_the_triton_interpreter():
    if INTERPRETED or CUDA:
        pytest.skip("this process runs the kernel cases itself")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def oracle(q, K, V, policies, t, S):
    """float64 softmax attention of each query over exactly the keys its head's policy shows at position ``t``."""
    B, Hq, D = q.shape
    G = Hq // len(policies)
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        end = history_end(t[b] // S, S)
        for h, p in enumerate(policies):
            keys = sorted({j for lo, hi in p.history_ranges(end) for j in range(lo, hi)} | set(range(end, t[b] + 1)))
            k, v = K[b, h, keys].double().cpu(), V[b, h, keys].double().cpu()
            for g in range(G):
                scores = q[b, h * G + g].double().cpu() @ k.T / D**0.5
                out[b, h * G + g] = torch.softmax(scores, -1) @ v
    return out


def filled_cache(policies, *, B, G, D, S, M, t, dtype, K, V) -> SegmentKVCache:
    """A one-layer cache holding positions ``0..t[b]`` of each row, written one position at a time (rings wrap)."""
    cache = SegmentKVCache(
        PolicyTable((tuple(policies),)), batch_size=B, max_length=M, segment_size=S, num_heads=len(policies) * G,
        head_dim=D, dtype=dtype, device=DEVICE,
    )  # fmt: skip
    layer = cache.layers[0]
    rows = torch.arange(B, device=DEVICE)[:, None, None]
    for p in range(max(t) + 1):
        pos = torch.tensor([[p if p <= tb else -1] for tb in t], device=DEVICE)
        slots = store_slots(layer.heads, pos, layer.trash)
        layer.k.index_put_((rows, slots), K[:, :, p : p + 1])
        layer.v.index_put_((rows, slots), V[:, :, p : p + 1])
    return cache


def run_kernel(cache, q, t, S, split=None, launch=None, k_new=None, v_new=None):
    layer = cache.layers[0]
    return decode_attention(
        q, layer.k, layer.v, torch.tensor(t, device=DEVICE), layer.heads, max_capacity=layer.max_capacity,
        total_slots=sum(x.capacity for x in layer.layouts), segment_size=S, scale=q.shape[-1] ** -0.5, split=split,
        launch=launch, k_new=k_new, v_new=v_new,
    )  # fmt: skip


@kernel_case
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_kernel_equals_the_oracle(seed, dtype):
    """Random policies per KV head (GQA or not), rows at different positions, splits of one block or several."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, Hkv, G = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 4, 5])
    D, S = rng.choice([16, 32]), rng.choice([2, 3, 8])
    M = rng.randint(20, 150)
    policies = [HeadPolicy.parse(rng.choice(POOL)) for _ in range(Hkv)]
    t = [rng.randrange(M) for _ in range(B)]
    K, V = (torch.randn(B, Hkv, M, D, device=DEVICE).to(dtype) for _ in range(2))
    q = torch.randn(B, Hkv * G, D, device=DEVICE).to(dtype)
    cache = filled_cache(policies, B=B, G=G, D=D, S=S, M=M, t=t, dtype=dtype, K=K, V=V)
    expected = oracle(q, K, V, policies, t, S)
    for split in (BLOCK_N, None):
        got = run_kernel(cache, q, t, S, split).double().cpu()
        torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m, s=split: f"split={s}: {m}")
    # other cuts of the same work: inner blocks smaller and larger than a split, splits not a multiple of the block,
    # the merge in the same launch
    cuts = ((Launch(block=16, per_sm=1), None), (Launch(block=128, warps=8, stages=3), 48), (Launch(merge=1), BLOCK_N))
    for launch, split in cuts:
        got = run_kernel(cache, q, t, S, split, launch).double().cpu()
        torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m, x=launch: f"{x}: {m}")


@kernel_case
@pytest.mark.parametrize("merge", [0, 1])
@pytest.mark.parametrize("seed", range(3))
def test_kernel_stores_the_steps_keys(seed, merge):
    """Given the step's K/V, the call stores them where the cache's own store puts them (rings wrap over an old key,
    a row at -1 stores nothing) and attends as if they had been stored before: the oracle's output, one split or many."""
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    B, Hkv, G, D, S = 3, rng.choice([1, 2, 3]), rng.choice([1, 4]), 16, rng.choice([2, 3, 8])
    M = rng.randint(40, 150)
    policies = [HeadPolicy.parse(rng.choice(POOL)) for _ in range(Hkv)]
    t = [rng.randrange(1, M) for _ in range(B - 1)] + [0]
    K, V = (torch.randn(B, Hkv, M, D, device=DEVICE) for _ in range(2))
    q = torch.randn(B, Hkv * G, D, device=DEVICE)
    expected_cache = filled_cache(policies, B=B, G=G, D=D, S=S, M=M, t=t, dtype=torch.float32, K=K, V=V)
    expected = oracle(q, K, V, policies, t, S)
    rows = torch.arange(B, device=DEVICE)
    for split in (BLOCK_N, None):
        cache = filled_cache(policies, B=B, G=G, D=D, S=S, M=M, t=[x - 1 for x in t], dtype=torch.float32, K=K, V=V)
        k_new, v_new = K[rows, :, t], V[rows, :, t]
        got = run_kernel(cache, q, t, S, split, Launch(merge=merge), k_new, v_new).double().cpu()
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, msg=lambda m, s=split: f"split={s}: {m}")
        for mine, want in ((cache.layers[0].k, expected_cache.layers[0].k), (cache.layers[0].v, expected_cache.layers[0].v)):
            torch.testing.assert_close(mine[:, :-1], want[:, :-1], rtol=0, atol=0)  # the last slot is the padding rows' trash
    sitting_out = run_kernel(cache, q, [-1] * B, S, None, Launch(merge=merge), k_new + 1, v_new + 1)
    assert torch.equal(sitting_out, torch.zeros_like(sitting_out))  # nothing seen, nothing stored
    torch.testing.assert_close(cache.layers[0].k[:, :-1], expected_cache.layers[0].k[:, :-1], rtol=0, atol=0)


@kernel_case
def test_merge_counters_return_to_zero():
    """The split counts that a call merging in its own launch keeps are back at zero after it: the next call (a replayed
    graph) merges right."""
    policies = [HeadPolicy.parse("all"), HeadPolicy.parse("window:3")]
    S, M, t = 8, 600, [590, 77]
    torch.manual_seed(3)
    K, V = (torch.randn(2, 2, M, 16, device=DEVICE) for _ in range(2))
    q = torch.randn(2, 4, 16, device=DEVICE)
    cache = filled_cache(policies, B=2, G=2, D=16, S=S, M=M, t=t, dtype=torch.float32, K=K, V=V)
    layer = cache.layers[0]
    counters = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    kwargs = dict(max_capacity=layer.max_capacity, total_slots=sum(x.capacity for x in layer.layouts), segment_size=S,
                  scale=0.25, split=BLOCK_N, counters=counters)  # fmt: skip
    for _ in range(2):
        got = decode_attention(q, layer.k, layer.v, torch.tensor(t, device=DEVICE), layer.heads, **kwargs)
        assert torch.equal(counters, torch.zeros_like(counters))
        torch.testing.assert_close(got.double().cpu(), oracle(q, K, V, policies, t, S), rtol=2e-5, atol=2e-5)


@kernel_case
def test_many_splits_merge_exactly():
    """More splits than either merge reads at once (36 > 32): the running log-sum-exp merge rescales correctly."""
    policies = [HeadPolicy.parse("all"), HeadPolicy.parse("sink:3+window:40")]
    S, M, t = 64, 2300, [2290]
    torch.manual_seed(7)
    K, V = (torch.randn(1, 2, M, 16, device=DEVICE) for _ in range(2))
    q = torch.randn(1, 2, 16, device=DEVICE)
    K[0, 0, 2100:2200] = 2 * q[0, 0]  # the largest scores sit in splits 32-34, past the first 32 the merge reads
    cache = filled_cache(policies, B=1, G=1, D=16, S=S, M=M, t=t, dtype=torch.float32, K=K, V=V)
    for launch in (Launch(merge=0), Launch(merge=1)):
        got = run_kernel(cache, q, t, S, split=BLOCK_N, launch=launch).double().cpu()
        torch.testing.assert_close(got, oracle(q, K, V, policies, t, S), rtol=2e-5, atol=2e-5)


@kernel_case
@pytest.mark.parametrize("launch", ["store=1,merge=0", "store=0,merge=0", "store=1,merge=1"])
def test_engine_decodes_with_the_kernel(launch, monkeypatch):
    """The whole decoding step with the kernel gives the exact path's logits, prompts of different lengths, mixed policies;
    the kernel storing the step's K/V or the cache storing them first, the splits merged in a second launch or the same."""
    monkeypatch.setenv(ENV, launch)
    policies = [["all", "none", "sink:1+window:3"], ["window:2", "none", "all"]]
    config = ModelConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=16,
        segment_size=3, history_policy=policies, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [3, 1, 4, 1, 5]]
    expected = SegmentedEngine(model, decode_attention="torch").generate(prompts, max_new_tokens=6, return_logits=True)
    engine = SegmentedEngine(model, decode_attention="triton", decode="eager")
    got = engine.generate(prompts, max_new_tokens=6, return_logits=True)
    assert got.tokens == expected.tokens
    for a, b in zip(got.step_logits, expected.step_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_launch_from_the_environment(monkeypatch):
    """``$SEGTRAIN_DECODE_KERNEL`` sets the fields it names; a bad one stops in one line that names the variable."""
    monkeypatch.delenv(ENV, raising=False)
    assert default_launch() == Launch()
    monkeypatch.setenv(ENV, "block=128, per_sm=4")
    assert default_launch() == Launch(block=128, warps=Launch().warps, stages=Launch().stages, per_sm=4)
    assert Launch.parse(default_launch().spec()) == default_launch()
    assert split_size(1, 1000, torch.device("cpu")) == 256  # 1000 slots over 4 programs, rounded up to 128-slot blocks
    assert split_size(1, 1000, torch.device("cpu"), Launch(block=16, per_sm=1)) == 1008
    for bad in ("block=100", "warps=0", "threads=4", "block=big", "merge=2"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(UserError, match="block|warps|threads|merge") as err:
            default_launch()
        assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_at_llama_shape_on_the_gpu(batch):
    """Llama-3-8B head shape (8 KV heads, GQA 4, D=128), 25% ``all`` and ``sink:4+window:64`` heads, thousands of keys, bf16."""
    S, M, D = 256, 3000, 128
    policies = [HeadPolicy.parse(p) for p in ["all", "all", "none", "none", "none", "sink:4+window:64", "none", "none"]]
    t = [M - 1 - 700 * b for b in range(batch)]
    torch.manual_seed(batch)
    K, V = (torch.randn(batch, 8, M, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(batch, 32, D, device=DEVICE, dtype=torch.bfloat16)
    cache = filled_cache(policies, B=batch, G=4, D=D, S=S, M=M, t=t, dtype=torch.bfloat16, K=K, V=V)
    expected = oracle(q, K, V, policies, t, S)
    for split in (BLOCK_N, 4 * BLOCK_N, None):
        got = run_kernel(cache, q, t, S, split).double().cpu()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for launch in (Launch(block=128, warps=8, stages=3, per_sm=8), Launch(block=32, warps=2, stages=4, per_sm=16)):
        got = run_kernel(cache, q, t, S, None, launch).double().cpu()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2, msg=lambda m, x=launch: f"{x}: {m}")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's process holds no compilable kernel: the parent compiles it")
@pytest.mark.parametrize("store, merge", [(True, True), (False, True), (True, False)])
def test_kernel_compiles_for_hopper_without_a_gpu(store, merge):
    """The interpreter accepts code that the compiler refuses: compile the kernel to sm_90 machine code here (Triton
    carries ptxas), at the 8B shape in bf16. The in-launch merge (merge=1) counts with acquire-release atomics at GPU
    scope after a barrier, and reads the other programs' partials past L1 (``.cg``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from segtrain.kernels import decode_attention as kernel_module

    pointers = {"POS": "*i64", "HEADS": "*i32", "O_PART": "*fp32", "LSE_PART": "*fp32", "COUNTERS": "*i32"}
    pointers |= dict.fromkeys(("Q", "K", "V", "K_NEW", "V_NEW", "OUT"), "*bf16")
    const = dict(G=4, G_PAD=16, D=128, BLOCK=64, PRECISION="tf32", STORE=store, MERGE=merge, G_POW2=4, BLOCK_C=16)
    fn = kernel_module._partial_kernel
    signature = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "scale" else "i32") for n in fn.arg_names}
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "num_stages": 3},
        )  # fmt: skip
    except RuntimeError as e:  # no ptxas for this platform in the Triton wheel
        if "ptxas" in str(e).lower():
            pytest.skip(f"Triton cannot assemble for sm_90 here: {e}")
        raise
    ptx = compiled.asm["ptx"]
    assert ("atom.global.gpu.acq_rel.add" in ptx) == merge and ("atom.global.gpu.acq_rel.exch" in ptx) == merge
    if merge:
        assert "bar.sync" in ptx[: ptx.index("atom.global.gpu.acq_rel.add")]
        assert "ld.global.cg" in ptx[ptx.index("atom.global.gpu.acq_rel.exch") :]
    assert compiled.asm["cubin"]


def test_block_positions_of_a_filled_cache_match_the_engine_semantics():
    """Sanity of the helper on any machine: ``filled_cache`` writes exactly what prefill of the same keys would."""
    S, M = 3, 11
    policies = [HeadPolicy.parse("sink:1+window:2"), HeadPolicy.parse("all")]
    K, V = (torch.randn(1, 2, M, 16, device=DEVICE) for _ in range(2))
    cache = filled_cache(policies, B=1, G=1, D=16, S=S, M=M, t=[9], dtype=torch.float32, K=K, V=V)
    cache.begin_block(Block((9,), (1,)))  # the step that stored position 9
    for h in range(2):
        for p in cache.held_positions(0, h, 0):
            torch.testing.assert_close(cache.key_value(0, h, 0, p)[0], K[0, h, p])
