"""The ``compile`` option: the regions around each attention slot trace as whole graphs and give the eager model's
loss and gradients (float64, with and without activation checkpointing); the option's values and refusals."""

import copy

import pytest
import torch
from attention_cases import history_dropped
from tiny_models import checkpointed as _checkpointed
from tiny_models import loss_and_grads as _loss_and_grads
from tiny_models import make_model, tiny_config
from tiny_models import portable_train_config as _cfg
from tool_scripts import load_tool

from segtrain.config import ConfigError
from segtrain.speed.portable import parallelize_portable
from segtrain.train.recipes.portable import compiles


@pytest.mark.parametrize(
    "checkpointing, backend",
    [(False, "aot_eager"), ("whole", "aot_eager"), ("around_attention", "aot_eager"), (False, "inductor")],
)
def test_compiled_regions_give_the_eager_loss_and_gradients(checkpointing, backend):
    """aot_eager checks the traced graphs; inductor (C++ kernels on the CPU, float64) also what GPU runs compile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = tiny_config(num_layers=2, history_policy=[["all", "sink:2+window:3"], ["none", "window:5"]])
    eager = make_model(config, dtype=torch.float64).train()
    eager.loss_chunk_size = 16  # several loss chunks, each through the compiled chunk
    if checkpointing:  # fullgraph: a graph break fails here
        keep = 2 if checkpointing == "around_attention" else 0
        compiled = _checkpointed(copy.deepcopy(eager), keep_attention=keep, compile=True, backend=backend)
    else:
        compiled = parallelize_portable(copy.deepcopy(eager), compile=True, backend=backend)

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 101, (2, 48), generator=g), torch.randint(0, 101, (2, 48), generator=g)
    loss, grads = _loss_and_grads(eager, ids, labels)
    loss_c, grads_c = _loss_and_grads(compiled, ids, labels)
    assert loss.item() > 1.0
    torch.testing.assert_close(loss_c, loss, rtol=1e-13, atol=0)
    assert grads.keys() == grads_c.keys()  # parameter names stay loadable
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-11, atol=1e-14, msg=name)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 3  # before, after, loss chunk: one graph each, shared by every layer and chunk


def _backward_matmuls(model, ids, labels) -> int:
    from torch.profiler import profile

    loss = model(ids, labels=labels)
    with profile() as prof:
        loss.backward()
    return sum(e.name == "aten::mm" for e in prof.events())


def test_kept_attention_layers_recompute_only_the_gemms_their_backward_reads():
    """Checkpointed inside the compiled graph, a layer's backward skips the q, k, v and down projections' forward
    GEMMs (their outputs feed no gradient); a checkpoint around the compiled call reruns all seven."""
    from segtrain.speed.activation_checkpoint import _checkpoint

    torch._dynamo.reset()
    config = tiny_config(num_layers=3, history_policy=[["all", "none"]] * 3)
    model = make_model(config, dtype=torch.float64).train()
    model.loss_chunk_size = 1000
    inside = _checkpointed(copy.deepcopy(model), keep_attention=3, compile=True, backend="aot_eager")
    around = parallelize_portable(copy.deepcopy(model), compile=True, backend="aot_eager")
    for layer in around.model.layers:  # the compiled regions, each called under a checkpoint (the assembly's wrappers)
        layer.before = lambda *args, region=layer.before: _checkpoint(region, None, *args)
        layer.after = lambda *args, region=layer.after: _checkpoint(region, None, *args)
    kept = _checkpointed(copy.deepcopy(model), keep_attention=3, keep_matmuls=2, compile=True, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, 101, (1, 64), generator=g), torch.randint(0, 101, (1, 64), generator=g)
    assert _backward_matmuls(around, ids, labels) - _backward_matmuls(inside, ids, labels) == 4 * 3
    # keeping the matmuls' outputs: not the output, gate and up projections either, in the 2 layers that keep them
    assert _backward_matmuls(inside, ids, labels) - _backward_matmuls(kept, ids, labels) == 3 * 2
    loss, grads = _loss_and_grads(around, ids, labels)
    for other in (inside, kept):
        loss_o, grads_o = _loss_and_grads(other, ids, labels)
        torch.testing.assert_close(loss_o, loss, rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grads_o[name], grad, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(compile="yes"), "portable.compile: must be auto, true or false, got 'yes'"),
        (dict(compile=True, zero_stage=3), "portable.compile: true cannot trace ZeRO-3"),
    ],
)
def test_bad_compile_values_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**fields)


def test_megatron_refuses_compile_true():
    with pytest.raises(ConfigError, match="portable: options of the portable model, but this config trains the megatron"):
        _cfg(compile=True, model_impl="megatron")


def test_auto_compiles_on_cuda_without_zero3():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiles(_cfg(), cuda) and not compiles(_cfg(), cpu)
    assert not compiles(_cfg(zero_stage=3), cuda)
    assert compiles(_cfg(compile=True), cpu) and not compiles(_cfg(compile=False), cuda)


def _bench_train():
    return load_tool("bench_train")


def test_bench_train_variants_and_kernel_categories():
    bench = _bench_train()
    assert bench.parse_variant("flash+compile+ac14") == dict(
        name="flash+compile+ac14", base="flash", compile=True, ac_layers=14, keep_attention=0, keep_matmuls=0, offload=False,
        fused_loss=False,
    )  # fmt: skip
    assert bench.parse_variant("causal") == dict(name="causal", base="causal", compile=False, ac_layers=None,
                                                 keep_attention=0, keep_matmuls=0, offload=False, fused_loss=False)  # fmt: skip
    assert bench.parse_variant("flash+compile+ka16+km4")["keep_matmuls"] == 4
    both = bench.parse_variant("flash+compile+ka16+off+fl")
    assert both["offload"] and both["fused_loss"] and both["keep_attention"] == 16
    assert bench.parse_variant("flash+compile+ka10")["keep_attention"] == 10
    assert bench.parse_variant("flex+ac0")["ac_layers"] == 0  # no activation checkpointing
    bad_specs = [("sdpa", "must start with one of"), ("flex+fast", "unknown lever 'fast'"), ("flex+acx", "unknown lever")]
    for bad, message in bad_specs:
        with pytest.raises(SystemExit, match=message):
            bench.parse_variant(bad)
    kernels = [
        ("void flash::FlashAttnFwdSm90<...>", 0.4),
        ("triton_tem_fused_flex_attention_backward_0", 0.1),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0.3),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.05),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 0.02),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<...log_softmax...>", 0.01),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 0.03),
        ("Memcpy DtoD (Device -> Device)", 0.01),
        ("Memcpy DtoH (Device -> Pinned)", 0.2),  # activation offload, beside the compute: not idle time
    ]
    fp8 = [("void transformer_engine::cast_transpose_kernel<...>", 0.02), ("sm90_xmma_gemm_e4m3e4m3_bf16f32", 0.1)]
    by8 = bench.summarize_kernels(fp8, step_s=1.0)
    assert by8["fp8 cast/amax"] == pytest.approx(0.02) and by8["gemm"] == pytest.approx(0.1)
    by = bench.summarize_kernels(kernels, step_s=1.0)
    assert by["attention"] == pytest.approx(0.5) and by["gemm"] == pytest.approx(0.35)
    assert by["elementwise/norm/rope"] == pytest.approx(0.02) and by["loss"] == pytest.approx(0.01)
    assert by["optimizer"] == pytest.approx(0.03) and by["copy/cast/fill"] == pytest.approx(0.01)
    assert by["host copies"] == pytest.approx(0.2) and by["idle"] == pytest.approx(1.0 - 0.92)
    top = bench.top_kernels(kernels + [("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0.3)], n=2)
    assert [(k["category"], k["calls"]) for k in top] == [("gemm", 2), ("attention", 1)]
    assert top[0]["seconds"] == pytest.approx(0.6)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend, keep_attention, keep_matmuls", [("flex", 0, 0), ("flash", 0, 0), ("flash", 2, 0), ("flash", 2, 1)]
)
def test_inductor_compiled_model_matches_eager_on_gpu(backend, keep_attention, keep_matmuls):
    """Inductor's kernels (bf16) against the eager model, checkpointed whole or around attention: the loss and each
    position's loss to bf16 rounding, gradients by relative norm.

    At init 0.02 the mean loss is about ln(V) whatever attention does (zeroing every attention output moved it by 5e-4),
    so the loss of each position carries the check: on a CPU (this shape, three seeds, bf16 against float64) rounding
    moved it by 4-5e-4 in relative norm, dropping every head's history (the wrong attention below) by 1.4-1.8e-2."""
    from segtrain.attention.flex import flash_available

    if backend == "flash" and not flash_available(torch.device("cuda")):
        pytest.skip("flash-attn-4 is not installed")
    torch._dynamo.reset()
    config = tiny_config(
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        segment_size=128,
        attention_backend=backend,
        history_policy={"fraction": 0.5},
        initializer_range=0.02,
    )
    with torch.device("cuda"):
        eager = make_model(config, dtype=torch.bfloat16).train()
    compiled = _checkpointed(copy.deepcopy(eager), keep_attention=keep_attention, keep_matmuls=keep_matmuls, compile=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 101, (2, 512), device="cuda", generator=g)
    labels = torch.randint(0, 101, (2, 512), device="cuda", generator=g)
    loss, grads = _loss_and_grads(eager, ids, labels)
    loss_c, grads_c = _loss_and_grads(compiled, ids, labels)
    torch.testing.assert_close(loss_c, loss, rtol=1e-3, atol=0)  # bf16 rounding: 3e-5 relative on a CPU
    with torch.no_grad():
        per_token, per_token_c = (m(ids, labels=labels, reduction="none") for m in (eager, compiled))
        with history_dropped(eager):
            wrong = eager(ids, labels=labels, reduction="none")  # a wrong attention: no head reads history
    tol = 4e-3
    print(f"per-position loss, relative norm: compiled {_rel(per_token_c, per_token):.2e}, wrong {_rel(wrong, per_token):.2e}")
    assert _rel(per_token_c, per_token) < tol
    assert _rel(wrong, per_token) > 2 * tol, "the loss tolerance cannot tell a wrong attention"
    for name, grad in grads.items():
        rel = (grads_c[name].float() - grad.float()).norm() / grad.float().norm()
        assert rel < 3e-2, f"{name}: relative gradient error {rel:.3g}"


@pytest.mark.parametrize("shift, status", [(1.002, 0), (1.05, 1)])
def test_compare_losses_reports_the_largest_difference(tmp_path, shift, status):
    import json
    import subprocess
    import sys
    from pathlib import Path

    for name, factor in [("plain", 1.0), ("levers", shift)]:
        (tmp_path / name).mkdir()
        lines = [
            json.dumps(dict(step=s, loss=(10 - s / 10) * (factor if s == 30 else 1), tokens_per_s=100.0 * s))
            for s in range(1, 51)
        ]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    tool = Path(__file__).parents[1] / "tools/compare_losses.py"
    runs = [str(tmp_path / "plain"), str(tmp_path / "levers")]
    done = subprocess.run([sys.executable, str(tool), *runs, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    result = json.loads((tmp_path / "out/losses.json").read_text())
    assert result["max_rel_diff_step"] == 30 and result["max_rel_diff"] == pytest.approx(shift - 1)
    assert result["final_rel_diff"] == 0 and result["labels"] == ["plain", "levers"]
    assert "largest relative difference" in done.stdout
