from dataclasses import dataclass, field

import pytest
import yaml

from segtrain.config import ConfigError, ModelConfig, from_dict, load_model_config, model_flavors
from segtrain.policy import HeadPolicy

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=4, segment_size=16)


def test_flavors_exist():
    assert {"tiny", "125m", "llama3.2-1b", "llama3-8b"} <= set(model_flavors())


@pytest.mark.parametrize("name", model_flavors())
def test_every_flavor_loads_and_validates(name):
    cfg = load_model_config(name)
    table = cfg.policy_table()
    assert (table.n_layers, table.n_kv_heads) == (cfg.num_layers, cfg.num_kv_heads)
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert from_dict(ModelConfig, cfg.to_dict()) == cfg  # round trip


def test_llama3_2_1b_shape():
    c = load_model_config("llama3.2-1b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        2048,
        16,
        32,
        8,
        8192,
        128256,
    )
    assert c.head_dim == 64 and c.rope_theta == 500000.0 and c.tie_word_embeddings
    assert c.rope_scaling["factor"] == 32.0 and c.rope_scaling["original_max_position_embeddings"] == 8192
    assert c.segment_size == 4096
    assert [str(p) for p in c.policy_table()[0]] == ["all"] * 2 + ["none"] * 6


def test_llama3_8b_shape():
    c = load_model_config("llama3-8b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        4096,
        32,
        32,
        8,
        14336,
        128256,
    )
    assert c.head_dim == 128 and c.rope_theta == 500000.0 and not c.tie_word_embeddings and c.rope_scaling is None
    assert c.segment_size == 4096 and c.history_policy == {"fraction": 0.25}


def test_tiny_is_cpu_sized():
    c = load_model_config("tiny")
    assert c.num_layers <= 4 and 64 <= c.hidden_size <= 128 and c.vocab_size <= 2048 and 32 <= c.segment_size <= 64


def test_derived_defaults():
    c = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4)
    assert c.num_kv_heads == 4 and c.head_dim == 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_kv_heads": 3}, "model.num_kv_heads: 3 does not divide num_heads=8"),
        ({"hiden_size": 64}, "model.hiden_size: unknown key"),
        ({"num_layers": "two"}, "model.num_layers: expected an integer"),
        ({"num_layers": 0}, "model.num_layers: must be a positive integer"),
        ({"segment_size": True}, "model.segment_size: expected an integer"),
        ({"tie_word_embeddings": "yes"}, "model.tie_word_embeddings: expected true or false"),
        ({"rope_theta": -1.0}, "model.rope_theta: must be > 0"),
        ({"head_dim": 7}, "model.head_dim: 7 must be even"),
        ({"history_policy": "sink:4+windw:8"}, "model.history_policy: .*windw:8"),
        ({"history_policy": ["all"] * 3}, "model.history_policy: .*3 layers"),
        ({"history_policy": {"first_k": 9}}, "model.history_policy: first_k"),
        ({"attention_backend": "fast"}, "model.attention_backend: unknown backend 'fast'"),
        (
            {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
            "model.rope_scaling.original_max_position_embeddings: required",
        ),
        (
            {
                "rope_scaling": {
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                    "beta": 1,
                }
            },
            "model.rope_scaling.beta: unknown key",
        ),
        (
            {
                "rope_scaling": {
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8,
                }
            },
            "model.rope_scaling.high_freq_factor",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "model.rope_scaling.rope_type: only 'llama3'"),
        ({"rope_scaling": "big"}, "model.rope_scaling: expected dict"),
    ],
)
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {**BASE, **change})


def test_missing_required_key_is_named():
    data = dict(BASE)
    del data["vocab_size"]
    with pytest.raises(ConfigError, match="model.vocab_size: required key is missing"):
        from_dict(ModelConfig, data)


def test_policy_specs():
    c = from_dict(ModelConfig, {**BASE, "history_policy": [["all", "none", "sink:4", "window:8"], "sink:2+window:4"]})
    assert c.policy_table()[0][2] == HeadPolicy(sink=4)
    assert c.policy_table()[1] == (HeadPolicy(sink=2, window=4),) * 4
    c = from_dict(ModelConfig, {**BASE, "history_policy": {"first_k": 1}})
    assert [p.all for p in c.policy_table()[1]] == [True, False, False, False]


@dataclass
class _Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class _Run:
    model: ModelConfig
    optim: _Optim = field(default_factory=_Optim)
    name: str | None = None


def test_from_dict_nests_and_prefixes_errors():
    run = from_dict(_Run, {"model": BASE, "optim": {"lr": 1, "betas": [0.8, 0.9]}}, where="")
    assert run.optim.lr == 1.0 and isinstance(run.optim.lr, float) and run.model.num_kv_heads == 4
    with pytest.raises(ConfigError, match=r"^optim.betas\[1\]: expected a number"):
        from_dict(_Run, {"model": BASE, "optim": {"betas": [0.9, "x"]}}, where="")
    with pytest.raises(ConfigError, match=r"^optim.momentum: unknown key"):
        from_dict(_Run, {"model": BASE, "optim": {"momentum": 0.9}}, where="")
    with pytest.raises(ConfigError, match=r"^steps: unknown key"):
        from_dict(_Run, {"model": BASE, "steps": 3}, where="")
    with pytest.raises(ConfigError, match=r"^model.num_heads: expected an integer"):
        from_dict(_Run, {"model": {**BASE, "num_heads": 1.5}}, where="")
    with pytest.raises(ConfigError, match=r"^model: expected a mapping"):
        from_dict(_Run, {"model": 3}, where="")
    with pytest.raises(ConfigError, match=r"^name: expected str"):
        from_dict(_Run, {"model": BASE, "name": 5}, where="")


def test_load_from_yaml_path_with_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_model_config(path).num_heads == 8
    assert load_model_config(path, {"segment_size": 4}).segment_size == 4
    assert ModelConfig.from_yaml(path) == load_model_config(path)
    with pytest.raises(ConfigError, match="neither a YAML file nor a flavor"):
        load_model_config("no-such-flavor")
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        load_model_config(path, {"num_kv_heads": 3})
