"""``tools/profile_decode.py``: its kernel bookkeeping on a made-up CUDA trace, and ``--smoke`` end to end on CPU (every
part runs, the split-KV kernel in Triton's interpreter, and the report's numbers add up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(ROOT / "tools"))  # the tool imports bench_decode and bench_prefill from beside it
    try:
        import profile_decode

        yield profile_decode
    finally:
        sys.path.remove(str(ROOT / "tools"))


# one decoder layer as an H100 runs it: cuBLAS GEMVs and GEMMs (one with a split-K reduction), Inductor's fused
# kernels, the cache store and the split-KV kernel; (name, projection or category)
LAYER = [
    ("triton_red_fused__to_copy_mean_mul_pow_rsqrt_0", "fused"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>", "q"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "k"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "k"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off", "v"),
    ("triton_poi_fused_add_cat_mul_1", "fused"),
    ("void at::native::index_put_kernel_impl<at::native::OpaqueType<2> >", "other"),
    ("_partial_kernel", "attention"),
    ("_combine_kernel", "attention"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>", "o"),
    ("triton_red_fused_add_mean_mul_pow_rsqrt_2", "fused"),
    ("void internal::gemvx::kernel<int, int, __nv_bfloat16, __nv_bfloat16, float, false, true>", "gate"),
    ("void internal::gemvx::kernel<int, int, __nv_bfloat16, __nv_bfloat16, float, false, true>", "up"),
    ("triton_poi_fused_mul_silu_3", "fused"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>", "down"),
]
TAIL = [
    ("triton_red_fused_mean_mul_pow_rsqrt_4", "fused"),
    ("nvjet_tst_128x8_64x12_2x1_v_bz_splitK_TNN", "lm_head"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "lm_head"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::ArgMaxOps<float>>>", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
]
SECONDS = {"q": 1, "k": 2, "v": 4, "o": 8, "gate": 16, "up": 32, "down": 64, "lm_head": 128}  # a sum names its parts
SECONDS |= {"fused": 256, "attention": 512, "other": 1024}


def trace(layers: int, steps: int) -> list[tuple[str, float]]:
    return [(name, SECONDS[what]) for _ in range(steps) for seq in [LAYER] * layers + [TAIL] for name, what in seq]


def test_kernels_of_a_step_are_grouped_by_projection(tool):
    layers, steps = 3, 2
    got = tool.categorize(trace(layers, steps), layers)
    per_layer = lambda *what: steps * layers * sum(n * SECONDS[w] for w, n in what)  # noqa: E731
    assert got["gemm qkv"] == per_layer(("q", 1), ("k", 2), ("v", 1))  # the split-K reduction counts with k
    assert got["gemm o"] == per_layer(("o", 1))
    assert got["gemm gate/up"] == per_layer(("gate", 1), ("up", 1))
    assert got["gemm down"] == per_layer(("down", 1))
    assert got["gemm lm_head"] == steps * 2 * SECONDS["lm_head"]
    assert got["attention (split-KV)"] == per_layer(("attention", 2))
    assert got["fused (norms, RoPE, SwiGLU)"] == per_layer(("fused", 4)) + steps * SECONDS["fused"]
    assert got["other kernels"] == per_layer(("other", 1)) + steps * 2 * SECONDS["other"]
    assert got["gemm (unattributed)"] == 0
    assert sum(got.values()) == sum(s for _, s in trace(layers, steps))


def fused_trace(layers: int, steps: int) -> list[tuple[str, float]]:
    """:func:`trace` as a model with fused projections launches it: one GEMM for q|k|v (k's seconds stand for it, its
    split-K reduction kept), one for gate|up."""
    layer = [(name, what) for name, what in LAYER if what not in ("q", "v", "up")]
    return [(name, SECONDS[what]) for _ in range(steps) for seq in [layer] * layers + [TAIL] for name, what in seq]


def test_kernels_of_a_fused_step_are_grouped_by_projection(tool):
    layers, steps = 3, 2
    kernels = fused_trace(layers, steps)
    got = tool.categorize(kernels, layers, fused=True)
    per_layer = lambda *what: steps * layers * sum(n * SECONDS[w] for w, n in what)  # noqa: E731
    assert got["gemm qkv"] == per_layer(("k", 2))
    assert got["gemm o"] == per_layer(("o", 1))
    assert got["gemm gate/up"] == per_layer(("gate", 1))
    assert got["gemm down"] == per_layer(("down", 1))
    assert got["gemm lm_head"] == steps * 2 * SECONDS["lm_head"]
    assert got["gemm (unattributed)"] == 0 and sum(got.values()) == sum(s for _, s in kernels)
    unfused = tool.categorize(kernels, layers)  # read as separate projections: the count does not match, nothing named
    assert unfused["gemm qkv"] == 0 and unfused["gemm (unattributed)"] > 0


def test_gemms_that_do_not_match_the_layers_are_not_guessed(tool):
    kernels = trace(2, 1)
    del kernels[1]  # one GEMV fewer: the launch order no longer names the projections
    got = tool.categorize(kernels, 2)
    assert all(got[f"gemm {p}"] == 0 for p in ("qkv", "o", "gate/up", "down", "lm_head"))
    assert got["gemm (unattributed)"] == sum(s for name, s in kernels if tool.kind_of(name).startswith("gemm"))


def test_step_breakdown_idle_gaps_are_what_kernels_leave(tool):
    kernels = trace(1, 4)
    busy = sum(s for _, s in kernels) / 4
    got = tool.step_breakdown(kernels, 4, busy + 100.0, 1)
    assert got["idle gaps"] == pytest.approx(100.0) and sum(got.values()) == pytest.approx(busy + 100.0)


def test_cpu_operators_count_their_own_time(tool):
    events = [(0, 10, "a"), (1, 3, "b"), (2, 1, "c"), (5, 2, "d"), (20, 1, "e")]  # b, d inside a; c inside b
    assert [(name, t) for _, t, name in tool._self_times(events)] == [("a", 5), ("b", 2), ("c", 1), ("d", 2), ("e", 1)]


def test_smoke_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "tools" / "profile_decode.py"), "--smoke", "--fuse", "--trace", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert all(c["fused_projections"] for c in report["cases"])  # --fuse
    assert report["device"] == "cpu" and [c["name"] for c in report["cases"]] == [
        f"{p} 300 B{b}" for b in (1, 2) for p in ("all25", "none")
    ]
    # smoke shape: 2 layers, 4 KV heads of 32 (all25: head 0 reads everything), segment 64, float32
    for case in report["cases"]:
        ms = case["ms_per_step"]
        assert ms["gemm (unattributed)"] == 0 and all(ms[f"gemm {p}"] > 0 for p in ("qkv", "o", "gate/up", "down", "lm_head"))
        assert sum(ms.values()) >= 1e3 * case["seconds_per_step"] * 0.999 and case["profiled_ms_per_step"] > 0
        alone = case["attention_alone"]
        t = alone["position"]
        recent = t - max(0, (t // 64 - 1) * 64) + 1  # keys from the previous segment on, the query's own included
        keys = 2 * ((t + 1) + 3 * recent if case["policy"] == "all25" else 4 * recent)
        assert alone["gb_read"] * 1e9 == pytest.approx(case["batch"] * keys * 2 * 32 * 4)
        assert alone["ms"] > 0
    traces = sorted(p.name for p in tmp_path.glob("trace_*.json"))
    assert traces == sorted(f"trace_{c['name'].replace(' ', '_')}.json" for c in report["cases"])
    assert json.loads((tmp_path / traces[0]).read_text())["traceEvents"]
    gemv = {(r["weight"], r["batch"]): r for r in report["gemv"]}
    assert {b for _, b in gemv} == {1, 2, 16}
    assert gemv["q|k|v fused", 1]["shape"] == [384, 128] and gemv["gate|up fused", 1]["shape"] == [512, 128]
    us = {k: r["us"] for k, r in gemv.items()}
    saved = 2 * (us["q", 16] + us["k", 16] + us["v", 16] - us["q|k|v fused", 16]) / 1e3
    assert report["fusion_saves_ms_per_step"]["B16 q|k|v"] == pytest.approx(saved)
    tail = run.stdout[run.stdout.index("json: ") :].splitlines()
    assert tail[2].startswith("GPU: cpu") and any(line.startswith("| gemm qkv |") for line in tail)
    assert tail[-1].startswith("Fusing would save")


def test_smoke_run_without_fusing(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "tools" / "profile_decode.py"), "--smoke", "--policies", "none"]
    run = subprocess.run(cmd + ["--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for case in json.loads((tmp_path / "profile.json").read_text())["cases"]:
        ms = case["ms_per_step"]
        assert case["fused_projections"] is False
        assert ms["gemm (unattributed)"] == 0 and all(ms[f"gemm {p}"] > 0 for p in ("qkv", "o", "gate/up", "down", "lm_head"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_every_gemm_is_named_and_the_step_adds_up(tmp_path):
    """The 1B shape at 8K, batch 1 and 4: the real kernels' names and launch order give every projection its GEMMs,
    the categories and the gaps make up the step, and the microbenchmarks read at a plausible bandwidth."""
    cmd = [sys.executable, str(ROOT / "tools" / "profile_decode.py"), "--shape", "llama3.2-1b", "--prompts", "8K"]
    cmd += ["--batches", "1,4", "--policies", "all25", "--segment-size", "1024", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    for case in report["cases"]:
        ms, step_ms = case["ms_per_step"], 1e3 * case["seconds_per_step"]
        assert ms["gemm (unattributed)"] == 0, case["top_kernels"]
        assert all(ms[f"gemm {p}"] > 0 for p in ("qkv", "o", "gate/up", "down", "lm_head")) and ms["attention (split-KV)"] > 0
        assert sum(ms.values()) == pytest.approx(step_ms, rel=0.25)  # the profiler's cost may push kernels past the step
        assert 0 < case["attention_alone"]["ms"] < step_ms
    bandwidth = report["copy_bandwidth"] / 1e9
    for row in report["gemv"]:
        assert 0.05 * bandwidth < row["gb_per_s"] < 1.3 * bandwidth, row  # from memory, not L2 (2 MiB weights: launch-bound)


def test_the_benchmarks_fuse_the_shared_weights_once(tool):
    """``bench_decode.fuse_shared``: the segtrain models and the HF model, which share their weights, read one fused copy
    (fusing adds no weight memory) and still compute what they did."""
    import bench_decode
    from bench_prefill import build_models

    from segtrain.config import load_model_config

    config = load_model_config("tiny", {**bench_decode.SMOKE_SHAPE, "num_kv_heads": 2, "segment_size": 64})
    hf, seg = build_models(config, torch.device("cpu"), torch.float64, bench_decode.POLICIES)
    ids = torch.randint(config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    models = [hf, *seg.values()]

    def storage_bytes() -> int:  # each storage once
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
        return sum(storages.values())

    with torch.no_grad():
        before, hf_before, weights = seg["none"](ids), hf(ids).logits, storage_bytes()
        bench_decode.fuse_shared(seg, hf)
        assert all(m.projections_fused for m in seg.values()) and storage_bytes() == weights
        qkv = {m.model.layers[1].self_attn.qkv_weight.untyped_storage().data_ptr() for m in seg.values()}
        assert qkv == {hf.model.layers[1].self_attn.v_proj.weight.untyped_storage().data_ptr()}
        torch.testing.assert_close(seg["none"](ids), before, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hf(ids).logits, hf_before, rtol=0, atol=0)
