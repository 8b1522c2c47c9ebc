import json

import pytest
import torch
import transformers
from tiny_models import make_model, tiny_config

from segtrain.checkpoint import load_config, load_pretrained, load_state_dict_into, save_pretrained
from segtrain.checkpoint.hf import hf_config_dict
from segtrain.config import ConfigError, ModelConfig
from segtrain.models.llama import LlamaForCausalLM, rope_inv_freq

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def hf_model(config: ModelConfig) -> transformers.LlamaForCausalLM:
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(config))
    hf_cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
        dict(tie_word_embeddings=True, num_kv_heads=6, rope_theta=1000.0),
        dict(num_kv_heads=1, head_dim=12, rope_scaling={**LLAMA3_SCALING, "rope_type": "llama3", "factor": 32.0}),
    ],
)
def test_equals_transformers_llama_when_every_head_reads_all(overrides):
    T = 40
    config = tiny_config(history_policy="all", segment_size=T, **overrides)
    ours = make_model(config)
    hf = hf_model(config)
    hf.load_state_dict(ours.state_dict())  # strict: a missing or unexpected parameter name raises
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.std() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope_inv_freq(config), hf.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_segments_longer_than_the_sequence_make_the_policy_irrelevant():
    T = 20
    a = make_model(tiny_config(segment_size=T, history_policy="all"))
    b = make_model(tiny_config(segment_size=T + 3, history_policy="none"))
    ids = torch.randint(0, 101, (1, T))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids))


def test_hf_weights_load_into_our_model():
    config = tiny_config(history_policy="all", segment_size=64, tie_word_embeddings=True)
    torch.manual_seed(3)
    hf = hf_model(config)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied checkpoints store the head once
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(state)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_parameter_names_are_hugging_face_names():
    names = set(make_model(tiny_config()).state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{proj}.weight" in names
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight" in names
        assert {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"} <= names


def test_logits_positions():
    model = make_model(tiny_config(segment_size=5))
    ids = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_positions="last"), full[:, -1:])
        torch.testing.assert_close(model(ids, logits_positions=torch.tensor([0, 7, 22])), full[:, [0, 7, 22]])
        rows = torch.tensor([[3, 4], [20, 1]])
        torch.testing.assert_close(model(ids, logits_positions=rows), torch.stack([full[0, [3, 4]], full[1, [20, 1]]]))
    with pytest.raises(ValueError, match="logits_positions"):
        model(ids, logits_positions="first")


def _plain_loss(model, ids, labels, mask):
    logits = model(ids).double()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    weight = (labels.flatten() != -100).double() * mask.flatten().double()
    return (ce * weight).sum() / weight.sum()


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_full_logits_loss_with_gradients(chunk):
    config = tiny_config(segment_size=6)
    model = make_model(config, dtype=torch.float64).train()
    B, T = 2, 29
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=g)
    labels = torch.randint(0, config.vocab_size, (B, T), generator=g)
    labels[0, :3] = -100
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    expected = _plain_loss(model, ids, labels, mask)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    model.loss_chunk_size = chunk
    loss = model(ids, labels=labels, loss_mask=mask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_loss_and_no_mask():
    model = make_model(tiny_config(segment_size=4))
    model.loss_chunk_size = 5
    ids = torch.randint(0, 101, (1, 17))
    labels = torch.roll(ids, -1, 1)
    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _plain_loss(model, ids, labels, torch.ones_like(ids)), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_position_ids_shift_rope_only():
    model = make_model(tiny_config(history_policy="all", segment_size=64))
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        same = model(ids, position_ids=torch.arange(12))
        shifted = model(ids, position_ids=torch.arange(12) + 100)
    torch.testing.assert_close(same, model(ids).detach())
    torch.testing.assert_close(shifted, same, rtol=1e-4, atol=1e-4)  # RoPE is relative: a shift changes only rounding


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied)
    model = make_model(config)
    save_pretrained(model, config, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "segtrain" and meta["model"]["num_kv_heads"] == 2
    assert load_config(tmp_path / "ckpt") == config
    loaded = load_pretrained(tmp_path / "ckpt")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    fresh = LlamaForCausalLM(config)
    load_state_dict_into(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())


def test_save_keeps_dtype_and_rejects_foreign_configs(tmp_path):
    config = tiny_config()
    save_pretrained(make_model(config, dtype=torch.bfloat16), config, tmp_path / "bf16")
    assert next(load_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    assert next(load_pretrained(tmp_path / "bf16", dtype=torch.float32).parameters()).dtype == torch.float32
    (tmp_path / "hf").mkdir()  # HF directories load (tests/test_convert.py); foreign or broken configs are named
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match="model_type: 'mistral' is not supported"):
        load_config(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="vocab_size: required key is missing"):
        load_config(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a segtrain checkpoint"):
        load_config(tmp_path / "hf")


def test_loss_holds_logits_for_one_chunk_at_a_time():
    model = make_model(tiny_config(segment_size=8)).train()
    model.loss_chunk_size = 6
    widths = []
    model.lm_head.register_forward_hook(lambda module, inputs, out: widths.append(out.shape[1]))
    ids = torch.randint(0, 101, (2, 25))
    model(ids, labels=ids).backward()
    assert widths == [6, 6, 6, 6, 1] + [1, 6, 6, 6, 6]  # forward, then recomputed chunk by chunk in backward (last first)
