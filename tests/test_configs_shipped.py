"""Every config we ship loads and validates, and the train configs agree with their model and DeepSpeed files."""

from pathlib import Path

import pytest

from segtrain.config import load_model_config
from segtrain.parallel.groups import make_layout
from segtrain.train.config import deepspeed_config, load_train_config
from segtrain.train.recipes import recipe_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs/model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_validate(path):
    cfg = load_model_config(path)
    table = cfg.policy_table()
    assert table.n_layers == cfg.num_layers and table.n_kv_heads == cfg.num_kv_heads


@pytest.mark.parametrize("path", sorted((ROOT / "configs/train").glob("*.yaml")), ids=lambda p: p.stem)
def test_train_configs_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # model/deepspeed paths inside are relative to the repository
    cfg = load_train_config(path, check_paths=False)  # data paths exist only after preprocessing
    p = cfg.parallel
    world = p.tp * p.pp * p.cp * 4  # e.g. four data-parallel groups
    layout = make_layout(world, p.tp, p.pp, p.cp)
    ds = deepspeed_config(cfg, layout.dp)
    assert ds["train_batch_size"] == cfg.micro_batch_size * cfg.grad_accum * layout.dp
    assert ds["zero_optimization"]["stage"] == p.zero_stage
    assert cfg.model.num_kv_heads % p.tp == 0, "KV heads (and their policies) must split over TP"
    assert (cfg.data.seq_length // cfg.model.segment_size) % p.cp == 0
    recipe_for(cfg).check(cfg, layout)  # e.g. the megatron model runs TP/PP with ZeRO 0-2, no CP
