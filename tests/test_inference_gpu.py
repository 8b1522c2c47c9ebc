"""The fast decoding path on the GPU gives the training forward's logits at every decoded position.

Mixed policies per (layer, KV head), a batch of prompts of different lengths, decoding across several segment
boundaries. The fast path is the default on CUDA: the step captured as a CUDA graph, layers compiled by
``torch.compile``, the Triton split-KV kernel. The training forward is the model's parallel form (``math``
backend: exact in fp32, no kernel compilation) run once on each grown sequence.
"""

import random

import pytest
import torch

from segtrain.config import ModelConfig
from segtrain.inference import SegmentedEngine
from segtrain.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

POLICIES = [
    ["all", "none", "sink:2+window:8", "none"],
    ["none", "all", "none", "window:5"],
    ["sink:1", "none", "all", "none"],
]


def make_model(dtype, segment_size=16):
    config = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=64,
        segment_size=segment_size, history_policy=POLICIES, attention_backend="math", initializer_range=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEVICE, dtype).eval()


def prompts(seed=0, lengths=(37, 5, 64, 20)):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def decoded_and_reference(engine, batch, n_new, *references):
    """The engine's logits at every decoded position of every row, and the training forward of each model in
    ``references`` (default: the engine's model) at the same positions of the grown sequences, stacked ``[N, V]``."""
    out = engine.generate(batch, max_new_tokens=n_new, return_logits=True)
    references = references or (engine.model,)
    got, expected = [], [[] for _ in references]
    for row, prompt in enumerate(batch):
        assert len(out.tokens[row]) == n_new
        seq = torch.tensor([list(prompt) + out.tokens[row]], device=DEVICE)
        got += [out.step_logits[k][row].float() for k in range(n_new)]
        for model, rows in zip(references, expected):
            with torch.no_grad():
                full = model(seq)[0].float().cpu()
            rows += [full[len(prompt) - 1 + k] for k in range(n_new)]
    return torch.stack(got), *(torch.stack(rows) for rows in expected)


def test_graph_decoding_equals_the_training_forward_fp32():
    model = make_model(torch.float32)
    engine = SegmentedEngine(model)
    assert (engine.decode, engine.decode_attention) == ("graph", "triton")
    got, expected = decoded_and_reference(engine, prompts(), 40)  # 3 segment boundaries at S=16
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert engine.compile_backend == "inductor", "torch.compile of the decoder layers failed and fell back (see the warning)"


def test_graph_decoding_in_bf16_is_as_accurate_as_the_training_forward():
    """bf16 against an fp32 reference on the same sequences: the fast path's error is of the training forward's size."""
    model = make_model(torch.bfloat16)
    reference = make_model(torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    engine = SegmentedEngine(model)
    got, exact, train_bf16 = decoded_and_reference(engine, prompts(1), 40, reference, model)
    err_fast = (got - exact).abs().max().item()
    err_train = (train_bf16 - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_fast <= 2 * err_train + 1e-2 * scale, (err_fast, err_train, scale)
    torch.testing.assert_close(got, train_bf16, rtol=0.05, atol=0.05 * scale)


@pytest.mark.parametrize("variant", ["sdpa", "offload", "uncompiled"])
def test_other_decoding_paths_equal_the_training_forward_fp32(variant):
    """Masked SDPA in the captured graph; offloaded history (eager, side-stream prefetch); the graph without compile."""
    kwargs = {
        "sdpa": dict(decode_attention="sdpa", compile_decode=False),
        "offload": dict(offload_history=True),
        "uncompiled": dict(compile_decode=False),
    }[variant]
    model = make_model(torch.float32)
    engine = SegmentedEngine(model, **kwargs)
    assert engine.decode == ("eager" if variant == "offload" else "graph")
    got, expected = decoded_and_reference(engine, prompts(2, (23, 50, 3)), 36)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("offload", [False, True])
def test_prefill_equals_the_training_forward_fp32(offload):
    """SDPA prefill over the static cache (ring keys gathered in position order), batched prompts of different lengths."""
    model = make_model(torch.float32)
    engine = SegmentedEngine(model, offload_history=offload, prefill_chunk=7)
    batch = prompts(3, (70, 9, 41))
    logits = engine.prefill(engine.new_cache(len(batch), 80), batch, all_logits=True)
    for row, prompt in enumerate(batch):
        with torch.no_grad():
            expected = model(torch.tensor([prompt], device=DEVICE))[0]
        got = logits[row, : len(prompt)]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
