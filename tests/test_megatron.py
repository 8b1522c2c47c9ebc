"""megatron-core model with segment attention on CPU (one process, TP=PP=1): logits, loss, gradients equal the portable model.

Here megatron builds its layers on CPU (``use_cpu_initialization``). TP and PP with CP run on CPU in
tests/test_megatron_cp.py (megatron's CUDA buffers answered by ``compat.megatron_core.cpu_collectives``), TP=2 and
PP=2 alone on GPUs in tests/test_megatron_gpu.py.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from megatron_cases import portable_and_megatron  # noqa: E402

from segtrain.config import ModelConfig  # noqa: E402
from segtrain.models.megatron_adapter import megatron_to_hf  # noqa: E402


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, segment_size=8,
                attention_backend="math", history_policy=[["all", "none"], ["none", "sink:2+window:5"], ["all", "all"]],
                rope_theta=500.0)  # fmt: skip
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"rope_scaling": dict(factor=8.0, low_freq_factor=2.0, high_freq_factor=3.0, original_max_position_embeddings=16)},
    ],
    ids=["untied", "tied", "llama3-rope"],
)
def test_logits_loss_and_grads_match_portable_float64(megatron_state, overrides):
    config = _config(**overrides)
    ref, model = portable_and_megatron(config)
    B, T = 2, 37  # a partial last segment
    ids = torch.randint(0, config.vocab_size, (B, T))
    labels = torch.randint(0, config.vocab_size, (B, T))
    positions = torch.arange(T)[None].expand(B, -1)

    logits = model(ids, positions, None)
    torch.testing.assert_close(logits, ref(ids), rtol=1e-12, atol=1e-12)

    per_token = model(ids, positions, None, labels=labels)  # megatron's vocab-parallel CE, float32
    assert per_token.shape == (B, T)
    loss = per_token.mean()
    ref_loss = ref(ids, labels=labels)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)

    # gradients of the float64 logits through a random cotangent, mapped back to HF names
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    (ref(ids) * cot).sum().backward()
    grads = megatron_to_hf({(0, 0): {k: p.grad for k, p in model.named_parameters()}}, config, 1, 1)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-10, msg=name)


def test_rope_runs_at_position_ids_per_row(megatron_state):
    """RoPE at the given positions (a CP shard's absolute ones; a document restarting at 0 with reset_position_ids)."""
    config = _config()
    ref, model = portable_and_megatron(config)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    positions = torch.stack([torch.arange(40, 61), torch.cat([torch.arange(9), torch.arange(12)])])
    want = ref(ids, position_ids=positions)
    assert not torch.allclose(want, ref(ids))  # the positions matter
    torch.testing.assert_close(model(ids, positions, None), want, rtol=1e-12, atol=1e-12)


def test_rope_is_segtrain_formula(megatron_state):
    from segtrain.models.llama import rope_inv_freq

    config = _config(
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    )
    _, model = portable_and_megatron(config)
    assert torch.equal(model.rotary_pos_emb.inv_freq, rope_inv_freq(config))
    emb = model.rotary_pos_emb(10)
    assert emb.shape == (10, 1, 1, config.head_dim) and emb.device.type == "cpu"
    torch.testing.assert_close(emb[3, 0, 0, : config.head_dim // 2], 3 * rope_inv_freq(config), rtol=0, atol=0)


def test_layer_spec_and_config(megatron_state):
    from segtrain.models.megatron import SegmentCoreAttention, layer_spec, transformer_config

    config = _config()
    spec = layer_spec(config, use_te=False)
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.module is SegmentCoreAttention
    assert core.params["segment_size"] == 8 and core.params["policies"] == config.policy_table()
    tcfg = transformer_config(config, tp=1, pp=1, dtype=torch.bfloat16)
    assert (tcfg.num_query_groups, tcfg.kv_channels, tcfg.ffn_hidden_size) == (2, 8, 48)
    assert tcfg.gated_linear_unit and not tcfg.add_bias_linear and tcfg.normalization == "RMSNorm" and tcfg.bf16
    assert tcfg.layernorm_epsilon == config.rms_norm_eps


def test_te_spec_needs_transformer_engine(megatron_state):
    from segtrain.models.megatron import layer_spec, te_available

    if not te_available():
        pytest.skip("transformer-engine is not installed here: the TE layer-spec path cannot be built")
    spec = layer_spec(_config(), use_te=True)
    assert spec.submodules.self_attention.submodules.core_attention.module.__name__ == "SegmentCoreAttention"


class _Group:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("tp", [1, 2])
def test_core_attention_takes_its_layers_and_ranks_policies(megatron_state, tp):
    """Layer number is megatron's 1-based global one (PP offset included); KV heads split as megatron splits them."""
    from segtrain.attention import segment_attention
    from segtrain.models.megatron import SegmentCoreAttention, transformer_config

    config = _config(
        num_kv_heads=4, num_heads=8, hidden_size=64, history_policy=[["all", "none", "sink:2", "window:3"]] * 2 + [["none"] * 4]
    )
    tcfg = transformer_config(config, dtype=torch.float64)
    table = config.policy_table()
    for rank in range(tp):
        for layer_number in (1, 2, 3):
            core = SegmentCoreAttention(tcfg, layer_number, pg_collection=SimpleNamespace(tp=_Group(tp, rank)),
                                        policies=table, segment_size=8, backend="math")  # fmt: skip
            n = config.num_kv_heads // tp
            assert core.core_attention.policy == table[layer_number - 1][rank * n : (rank + 1) * n]
            T, B, Hq, Hkv, D = 29, 2, config.num_heads // tp, n, config.head_dim
            q = torch.randn(T, B, Hq, D, dtype=torch.float64)
            k, v = torch.randn(2, T, B, Hkv, D, dtype=torch.float64)
            out = core(q, k, v, None)
            assert out.shape == (T, B, Hq * D)
            want = segment_attention(
                *(t.permute(1, 2, 0, 3) for t in (q, k, v)),
                segment_size=8,
                policy=core.core_attention.policy,
                backend="reference",
            )
            torch.testing.assert_close(out, want.permute(2, 0, 1, 3).reshape(T, B, -1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="layer_number=4"):
        SegmentCoreAttention(tcfg, 4, policies=table, segment_size=8)


def test_chunked_loss_equals_whole_sequence_loss(megatron_state):
    config = _config(tie_word_embeddings=True)
    _, model = portable_and_megatron(config)
    ids = torch.randint(0, config.vocab_size, (2, 37))
    labels = torch.randint(0, config.vocab_size, (2, 37))
    positions = torch.arange(37)[None].expand(2, -1)
    results = []
    for chunk in (1024, 8):
        model.loss_chunk_size = chunk
        model.zero_grad()
        per_token = model(ids, positions, None, labels=labels)
        (per_token * torch.rand(per_token.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((per_token.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for name, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_megatron_init_is_the_portable_models(megatron_state):
    """Every weight N(0, initializer_range), output projections too (megatron's default would scale them by 1/sqrt(2L))."""
    from segtrain.models.megatron import build_gpt_model

    config = _config(num_layers=8, hidden_size=64, intermediate_size=128, initializer_range=0.02,
                     history_policy={"fraction": 0.5})  # fmt: skip
    torch.manual_seed(0)
    model = build_gpt_model(config, dtype=torch.float32, use_cpu_initialization=True)
    stds = {n: p.std().item() for n, p in model.named_parameters() if p.dim() == 2}
    for name in ("linear_proj", "linear_fc2", "linear_qkv", "linear_fc1"):
        got = [s for n, s in stds.items() if name in n]
        assert got and all(0.018 < s < 0.022 for s in got), (name, got)


@pytest.mark.parametrize("cross_entropy", [False, True], ids=["swiglu+residual", "+cross-entropy"])
def test_fused_elementwise_kernels_equal_unfused_float64(megatron_state, cross_entropy):
    """megatron's fused SwiGLU and residual add (``fused=True``, the CUDA default; TE's RoPE kernel is not here) compute
    what the unfused model does, the chunked loss and every gradient in float64. Its fused cross-entropy (on for bf16
    models) rounds the logits' gradient to bf16: the same loss, gradients within bf16 rounding."""
    from segtrain.models.megatron import build_gpt_model

    config = _config()
    _, unfused = portable_and_megatron(config)
    fused = build_gpt_model(config, dtype=torch.float64, use_cpu_initialization=True, fused=True,
                            cross_entropy_loss_fusion=cross_entropy)  # fmt: skip
    assert fused.config.bias_activation_fusion and fused.config.bias_dropout_fusion and not unfused.config.bias_activation_fusion
    fused.load_state_dict(unfused.state_dict())
    fused.loss_chunk_size = unfused.loss_chunk_size = 16  # the chunked loss path (T > chunk)
    B, T = 2, 37
    ids, labels = torch.randint(0, config.vocab_size, (B, T)), torch.randint(0, config.vocab_size, (B, T))
    positions = torch.arange(T)[None].expand(B, -1)
    out = {}
    for name, model in (("unfused", unfused), ("fused", fused)):
        loss = model(ids, positions, None, labels=labels)
        loss.mean().backward()
        out[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    tol = dict(rtol=1e-6, atol=1e-6) if cross_entropy else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["fused"][0], out["unfused"][0], **tol)
    for name, grad in out["fused"][1].items():
        want = out["unfused"][1][name]
        if cross_entropy:
            assert 1e-5 < ((grad - want).norm() / want.norm()).item() < 4e-3, name  # bf16 rounding, and only that
        else:
            torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-13, msg=name)
