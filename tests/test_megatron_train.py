"""The training loop on the megatron model (CPU, one process, TP=PP=1): the losses of the portable model from the
same weights; checkpoints hold one megatron shard file that converts back to the exported HF weights; configs the
megatron path cannot run stop naming the field."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_train import corpus, losses, train, write_config  # noqa: F401  (corpus is a fixture)

from segtrain.config import ConfigError, load_model_config
from segtrain.train.config import load_train_config
from segtrain.train.distributed import Layout, LayoutError

pytest.importorskip("megatron.core", reason="megatron-core is not installed")


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from segtrain.models.io import save_pretrained
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny", {"tie_word_embeddings": False, "attention_backend": "math"})
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("init")
    save_pretrained(LlamaForCausalLM(config), config, out)
    return out, config


def test_megatron_loop_logs_the_portable_losses(tmp_path, corpus, init_dir):  # noqa: F811
    path, config = init_dir
    model = {"from": "configs/model/tiny.yaml", "tie_word_embeddings": False, "attention_backend": "math"}
    runs = {}
    for impl in ("portable", "megatron"):
        (tmp_path / impl).mkdir()
        cfg = write_config(tmp_path / impl, corpus, model=model, model_impl=impl, steps=4, save_every=4, grad_accum=2)
        train(cfg, "--init-from", os.fspath(path))
        runs[impl] = losses(tmp_path / impl / "run")
    assert list(runs["megatron"]) == [1, 2, 3, 4]
    for step, loss in runs["portable"].items():
        assert runs["megatron"][step] == pytest.approx(loss, rel=2e-4), (step, runs)

    # the checkpoint: DeepSpeed's one mp_rank_00 file per model-parallel rank, megatron names, back to the export
    from segtrain.models.megatron_adapter import load_megatron_shards, megatron_to_hf

    ckpt = tmp_path / "megatron" / "run" / "checkpoints"
    shards, tp, pp = load_megatron_shards(ckpt)
    assert (tp, pp) == (1, 1) and "decoder.layers.0.self_attention.linear_qkv.weight" in shards[(0, 0)]
    meta = json.loads((ckpt / "step_00000004" / "trainer_state.json").read_text())
    assert meta["config"]["model_impl"] == "megatron"
    hf = megatron_to_hf(shards, config, tp, pp)
    exported = load_file(os.fspath(tmp_path / "megatron" / "run" / "final" / "model.safetensors"))
    assert set(hf) == set(exported)
    assert all(torch.equal(hf[k], exported[k]) for k in hf)


@pytest.mark.parametrize(
    "fields,layout,error,match",
    [
        ({"parallel": {"tp": 2, "zero_stage": 3}}, Layout(2, 1, 1, 1), ConfigError, "parallel.zero_stage: ZeRO-3"),
        ({"parallel": {"pp": 2, "zero_stage": 0}}, Layout(1, 2, 1, 1), ConfigError, "parallel.zero_stage: 0 with parallel.pp=2"),
        ({"parallel": {"pp": 2, "zero_stage": 1}}, Layout(1, 2, 1, 1), ConfigError, "model.tie_word_embeddings"),
        ({"parallel": {"tp": 2, "cp": 2}}, Layout(2, 1, 2, 1), LayoutError, "parallel.cp=2"),
        ({"parallel": {"tp": 4}}, Layout(4, 1, 1, 1), ConfigError, "model.num_kv_heads: 2 is not a multiple of parallel.tp=4"),
        (
            {"model_impl": "megatron", "data": {"reset_position_ids": True}},
            Layout(1, 1, 1, 1),
            ConfigError,
            "data.reset_position_ids",
        ),
        ({"model_impl": "megaton"}, None, ConfigError, "model_impl: must be"),
    ],
)
def test_megatron_configs_that_cannot_run_name_the_field(tmp_path, corpus, fields, layout, error, match):  # noqa: F811
    from segtrain.train import megatron_step

    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update({f"{key}__{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    path = write_config(tmp_path, corpus, **flat)
    with pytest.raises(error, match=match):
        cfg = load_train_config(path)
        assert megatron_step.uses_megatron(cfg)
        megatron_step.check(cfg, layout)
