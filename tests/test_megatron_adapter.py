"""HF <-> megatron shard conversion: bit-exact round trips, and the fused layouts compute what HF's projections do."""

import json

import pytest
import torch
import torch.nn.functional as F

from segtrain.checkpoint.run import load_megatron_shards
from segtrain.config import ConfigError, ModelConfig
from segtrain.models.llama import LlamaForCausalLM
from segtrain.models.megatron_adapter import hf_to_megatron, layer_range, megatron_to_hf
from segtrain.parallel.groups import model_parallel_rank


def _config(tie: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=8, num_kv_heads=4,
                head_dim=8, segment_size=8, tie_word_embeddings=tie)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _state(config: ModelConfig, dtype=torch.float64) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms random too, so a swapped norm would show
        for p in model.parameters():
            p.normal_()
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_bit_exact(tp, pp, tie):
    config = _config(tie)
    state = _state(config, torch.bfloat16)
    shards = hf_to_megatron(state, config, tp, pp)
    assert set(shards) == {(r, p) for r in range(tp) for p in range(pp)}
    back = megatron_to_hf(shards, config, tp, pp)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1)])
def test_shard_names_and_shapes(tp, pp):
    c = _config(tie=True)
    shards = hf_to_megatron(_state(c), c, tp, pp)
    D, G, Hq = c.head_dim, c.num_kv_heads, c.num_heads
    for (r, p), shard in shards.items():
        n_local = c.num_layers // pp
        assert {k for k in shard if k.startswith("decoder.layers.")} == {
            f"decoder.layers.{i}.{n}"
            for i in range(n_local)
            for n in ("input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
                      "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
        }  # fmt: skip
        assert shard["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((Hq + 2 * G) * D // tp, c.hidden_size)
        assert shard["decoder.layers.0.self_attention.linear_proj.weight"].shape == (c.hidden_size, Hq * D // tp)
        assert shard["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * c.intermediate_size // tp, c.hidden_size)
        assert ("embedding.word_embeddings.weight" in shard) == (p == 0)
        assert ("decoder.final_layernorm.weight" in shard) == (p == pp - 1)
        # tied with pp > 1: the last stage keeps a copy of the embedding as megatron's output layer
        assert ("output_layer.weight" in shard) == (p == pp - 1 and pp > 1)
        if p == pp - 1 and pp > 1:
            assert torch.equal(shard["output_layer.weight"], shards[(r, 0)]["embedding.word_embeddings.weight"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_layout_matches_hf_projections(tp):
    """Each TP shard's fused QKV output, split as megatron splits it, equals HF's q/k/v heads of its query groups."""
    c = _config()
    state = _state(c)
    shards = hf_to_megatron(state, c, tp, 1)
    x = torch.randn(5, c.hidden_size, dtype=torch.float64)
    D, G, Hq = c.head_dim, c.num_kv_heads, c.num_heads
    q_hf = (x @ state["model.layers.1.self_attn.q_proj.weight"].T).view(5, Hq, D)
    k_hf = (x @ state["model.layers.1.self_attn.k_proj.weight"].T).view(5, G, D)
    v_hf = (x @ state["model.layers.1.self_attn.v_proj.weight"].T).view(5, G, D)
    g_local, per_group = G // tp, Hq // G
    for r in range(tp):
        mixed = x @ shards[(r, 0)]["decoder.layers.1.self_attention.linear_qkv.weight"].T
        # megatron: [sq, ng, (np/ng + 2) * hn] -> split into query, key, value along the last dim
        mixed = mixed.view(5, g_local, (per_group + 2) * D)
        q, k, v = mixed.split([per_group * D, D, D], dim=-1)
        groups = slice(r * g_local, (r + 1) * g_local)
        torch.testing.assert_close(
            q.reshape(5, g_local * per_group, D),
            q_hf[:, r * g_local * per_group : (r + 1) * g_local * per_group],
            rtol=1e-12,
            atol=1e-12,
        )
        torch.testing.assert_close(k.reshape(5, g_local, D), k_hf[:, groups], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v.reshape(5, g_local, D), v_hf[:, groups], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_and_swiglu_shards_sum_to_hf(tp):
    """linear_proj / linear_fc2 partial sums over TP ranks (megatron's all-reduce) equal HF's o_proj and MLP."""
    c = _config()
    state = _state(c)
    shards = hf_to_megatron(state, c, tp, 2)
    x = torch.randn(3, c.hidden_size, dtype=torch.float64)
    layer, p, i = 3, 1, 3 - layer_range(c, 2, 1).start
    m = f"model.layers.{layer}.mlp."
    ref = F.silu(x @ state[m + "gate_proj.weight"].T) * (x @ state[m + "up_proj.weight"].T) @ state[m + "down_proj.weight"].T
    out = 0
    for r in range(tp):
        gate, up = (x @ shards[(r, p)][f"decoder.layers.{i}.mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        out = out + (F.silu(gate) * up) @ shards[(r, p)][f"decoder.layers.{i}.mlp.linear_fc2.weight"].T
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    a = torch.randn(3, c.num_heads * c.head_dim, dtype=torch.float64)
    ref = a @ state[f"model.layers.{layer}.self_attn.o_proj.weight"].T
    w = [shards[(r, p)][f"decoder.layers.{i}.self_attention.linear_proj.weight"] for r in range(tp)]
    out = sum(part @ w_r.T for part, w_r in zip(a.chunk(tp, dim=-1), w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_te_names_and_extra_state_are_read():
    c = _config()
    state = _state(c)
    shards = hf_to_megatron(state, c, 2, 1)
    for shard in shards.values():
        for i in range(c.num_layers):
            p = f"decoder.layers.{i}."
            shard[p + "self_attention.linear_qkv.layer_norm_weight"] = shard.pop(p + "input_layernorm.weight")
            shard[p + "mlp.linear_fc1.layer_norm_weight"] = shard.pop(p + "pre_mlp_layernorm.weight")
            shard[p + "self_attention.core_attention._extra_state"] = torch.zeros(0)
    back = megatron_to_hf(shards, c, 2, 1)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_errors_name_the_field():
    c = _config()
    with pytest.raises(ConfigError, match="model.num_kv_heads: 4 is not a multiple of parallel.tp=8"):
        hf_to_megatron(_state(c), c, 8, 1)
    with pytest.raises(ConfigError, match="model.num_layers: 4 is not a multiple of parallel.pp=3"):
        hf_to_megatron(_state(c), c, 1, 3)
    with pytest.raises(ConfigError, match="model.vocab_size: 97"):
        hf_to_megatron({}, _config(vocab_size=97), 2, 1)
    shards = hf_to_megatron(_state(c), c, 2, 1)
    del shards[(1, 0)]
    with pytest.raises(KeyError, match="tp=2 x pp=1"):
        megatron_to_hf(shards, c, 2, 1)


def test_load_megatron_shards_reads_deepspeed_layout(tmp_path):
    """The files DeepSpeed writes per model-parallel rank (``mp_rank_XX_model_states.pt``, ``module``)."""
    c = _config()
    state = _state(c, torch.bfloat16)
    tp, pp = 2, 2
    shards = hf_to_megatron(state, c, tp, pp)
    tag = tmp_path / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    for (r, p), shard in shards.items():
        torch.save(
            {"module": shard, "mp_world_size": tp * pp}, tag / f"mp_rank_{model_parallel_rank(r, p, tp):02d}_model_states.pt"
        )
    (tag / "trainer_state.json").write_text(
        json.dumps({"step": 10, "config": {"parallel": {"tp": tp, "pp": pp}, "model": c.to_dict()}})
    )
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    for where in (tag, tmp_path / "checkpoints"):
        loaded, tp2, pp2 = load_megatron_shards(where)
        assert (tp2, pp2) == (tp, pp)
        back = megatron_to_hf(loaded, c, tp2, pp2)
        assert all(torch.equal(back[k], v) for k, v in state.items())
    (tag / "mp_rank_03_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="tp_rank=1, pp_rank=1"):
        load_megatron_shards(tag)


def test_spelled_like_renames_norms_for_a_transformer_engine_model():
    from segtrain.models.megatron_adapter import spelled_like

    t = torch.ones(2)
    shard = {"decoder.layers.0.input_layernorm.weight": t, "decoder.layers.0.pre_mlp_layernorm.weight": 2 * t,
             "decoder.layers.0.mlp.linear_fc1.weight": 3 * t}  # fmt: skip
    te = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
          "decoder.layers.0.mlp.linear_fc1.weight"]  # fmt: skip
    renamed = spelled_like(shard, te)
    assert sorted(renamed) == sorted(te)
    assert renamed["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] is shard["decoder.layers.0.pre_mlp_layernorm.weight"]
    assert spelled_like(shard, list(shard)) == shard  # a local-spec model keeps its names
