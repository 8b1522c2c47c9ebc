"""The dependency workarounds in segtrain/compat/ hold for the installed versions: fails loudly on an upgrade."""

import inspect

import pytest


def test_megatron_core_version_and_internals():
    import megatron.core
    from megatron.core.datasets import blended_dataset
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from segtrain.compat import megatron_core

    assert megatron_core.check_version(), f"megatron-core {megatron.core.__version__}: re-check segtrain/compat/megatron_core.py"
    assert megatron_core.postprocess_signature_matches(), "GPTModel._postprocess changed: re-check chunked_loss_gpt_model"
    assert {"get_freqs_non_repeated", "get_emb"} <= set(vars(RotaryEmbedding)), "RotaryEmbedding changed"
    # the unguarded call single_process_rank answers; when upstream guards it, drop the workaround
    assert "torch.distributed.get_rank()" in inspect.getsource(blended_dataset.BlendedDataset)


def test_segment_rotary_embedding_keeps_given_frequencies_on_cpu():
    import torch

    from segtrain.compat.megatron_core import segment_rotary_embedding

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    rope = segment_rotary_embedding(inv_freq * 0.5, kv_channels=8)
    emb = rope.get_emb(5, offset=3)
    assert emb.shape == (5, 1, 1, 8) and emb.device.type == "cpu"
    want = torch.arange(3, 8).float()[:, None] * inv_freq * 0.5
    torch.testing.assert_close(emb[:, 0, 0, :4], want)


def test_deepspeed_version_and_internals():
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    from segtrain.compat import deepspeed as ds_compat

    assert ds_compat.check_version(), f"deepspeed {deepspeed.__version__}: re-check segtrain/compat/deepspeed.py"
    assert hasattr(DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict")
    logger = ds_compat.deepspeed_logger()  # the logger segtrain.train.library_log moves to the run's log file
    assert logger.name == "DeepSpeed" and not logger.propagate and logger.handlers
    assert hasattr(DeepSpeedEngine, "get_global_grad_norm")


def test_untested_versions_warn_once():
    from segtrain.compat import warn_if_untested

    assert warn_if_untested("somepkg", "1.2.3", ("1.2.",))
    with pytest.warns(UserWarning, match="somepkg 9.0 is outside"):
        assert not warn_if_untested("somepkg", "9.0", ("1.2.",))
