"""Document mode in the megatron model (CPU, gloo, float64): the portable model's logits and gradients, which
tests/test_documents.py proves equal to each document run alone."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from megatron_cases import portable_and_megatron  # noqa: E402
from tiny_models import DOCUMENTS_FORWARD, documents_config  # noqa: E402

from segtrain.models.megatron_adapter import megatron_to_hf  # noqa: E402


def test_megatron_model_in_document_mode_equals_portable(megatron_state):
    config = documents_config(
        segment_size=8, num_layers=3, history_policy=[["all", "none"], ["none", "sink:2+window:5"], ["all", "all"]]
    )
    ref, model = portable_and_megatron(config)
    lengths = [[5, 20, 3, 9], [37]]  # shorter than a segment, across segment boundaries; a row of one document
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    ids = torch.randint(0, config.vocab_size, positions.shape)
    logits = model(ids, positions, None)
    want = ref(ids, position_ids=positions)
    torch.testing.assert_close(logits, want, **DOCUMENTS_FORWARD)
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    (want * cot).sum().backward()
    grads = megatron_to_hf({(0, 0): {k: p.grad for k, p in model.named_parameters()}}, config, 1, 1)
    ref_grads = dict(ref.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name].grad, rtol=1e-10, atol=1e-10, msg=name)
    one_stream = model(ids, torch.arange(37)[None].expand(2, -1).contiguous(), None)
    assert (one_stream - logits).abs().max() > 1e-4  # the check can fail
