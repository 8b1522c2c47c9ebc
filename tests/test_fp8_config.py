"""The ``megatron.fp8`` training option: defaults filled, every bad key or value named, the recipes that refuse it, and the
megatron ``TransformerConfig`` fields it becomes (the FP8 model itself is tested on the GPU: test_megatron_te_gpu.py)."""

from types import SimpleNamespace

import pytest

from segtrain.config import ConfigError


def _cfg(fp8, precision="bf16"):
    from segtrain.config import load_model_config
    from segtrain.train.config import TrainConfig, validate
    from segtrain.train.recipes.megatron import MegatronConfig

    cfg = TrainConfig(model=load_model_config("tiny"), megatron=MegatronConfig(fp8=fp8), model_impl="megatron")
    cfg.data.synthetic, cfg.data.tokenizer, cfg.data.seq_length = "passkey", "unused.model", 256
    cfg.parallel.precision = precision
    return validate(cfg, check_paths=False)


def test_defaults_fill_and_become_megatron_fields():
    from segtrain.train.recipes.megatron import fp8_overrides

    cfg = _cfg({"amax_history": 16})
    assert cfg.megatron.fp8 == {"recipe": "delayed", "format": "hybrid", "amax_history": 16, "amax_compute": "max"}
    assert fp8_overrides(cfg.megatron.fp8) == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 16,
                                               "fp8_amax_compute_algo": "max"}  # fmt: skip
    assert fp8_overrides(_cfg(None).megatron.fp8) == {}


@pytest.mark.parametrize(
    "fp8, precision, match",
    [
        ({"amax_histroy": 16}, "bf16", r"megatron.fp8.amax_histroy: unknown; the keys are"),
        ({"recipe": "mxfp8"}, "bf16", "megatron.fp8.recipe: only 'delayed'"),
        ({"format": "e5m2"}, "bf16", "megatron.fp8.format: must be 'hybrid'"),
        ({"amax_history": 0}, "bf16", "megatron.fp8.amax_history: must be a positive integer"),
        ({"amax_compute": "mean"}, "bf16", "megatron.fp8.amax_compute: must be 'max' or 'most_recent'"),
        ({}, "fp32", "set parallel.precision: bf16"),
        ("on", "bf16", "megatron.fp8: must be a mapping"),
    ],
)
def test_bad_fp8_settings_name_the_field(fp8, precision, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(fp8, precision)


def test_the_portable_model_refuses_fp8():
    from segtrain.config import load_model_config
    from segtrain.train.config import TrainConfig, validate
    from segtrain.train.recipes.megatron import MegatronConfig

    cfg = TrainConfig(model=load_model_config("tiny"), megatron=MegatronConfig(fp8={}))
    cfg.data.synthetic, cfg.data.seq_length, cfg.parallel.precision = "passkey", 256, "bf16"
    with pytest.raises(ConfigError, match="megatron: options of the megatron model, but this config trains the portable"):
        validate(cfg, check_paths=False)


def test_megatron_without_transformer_engine_refuses_fp8():
    from segtrain.models.megatron import te_available
    from segtrain.train.recipes.megatron import MegatronRecipe

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match="megatron.fp8: needs Transformer Engine"):
        MegatronRecipe().check(_cfg({}), SimpleNamespace(tp=1, pp=1, cp=1))
