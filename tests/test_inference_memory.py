"""``segtrain.inference.memory``: the estimate against what the model and the cache really allocate (exactly, on CPU),
against prefill peaks measured on an H100, and the largest batch as the boundary of what fits.

GPU: ``pytest -m gpu tests/test_inference_memory.py`` checks the estimate against a real generation's peak."""

import dataclasses
import math

import pytest
import torch

from segtrain.config import load_model_config
from segtrain.errors import UserError
from segtrain.inference import SegmentedEngine, SegmentKVCache
from segtrain.inference.memory import (
    GIB,
    RESERVE_BYTES,
    BatchTooLarge,
    check_batch_fits,
    decoding_memory,
    largest_batch,
)
from segtrain.models.llama import LlamaForCausalLM

SMALL = dict(hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=16, segment_size=16)
POLICIES = [
    "none",
    "all",
    "sink:3+window:5",
    "window:7",
    {"fraction": 0.5},
    [["all", "sink:2", "window:40", "none"], "sink:1+window:3"],  # a row per layer
]


def small_config(policy, **overrides):
    return load_model_config("tiny", {**SMALL, "history_policy": policy, **overrides})


@pytest.mark.parametrize("flavor, overrides", [("tiny", {}), ("tiny", {"tie_word_embeddings": False}), ("llama3-8b", {})])
def test_weights_are_the_models_parameters(flavor, overrides):
    config = load_model_config(flavor, overrides)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = {p.data_ptr() if not p.is_meta else id(p): p.numel() for p in model.parameters()}  # a tied head once
    assert decoding_memory(config, 1, 64, dtype=torch.bfloat16).weights == 2 * sum(unique.values())
    if flavor == "llama3-8b":
        assert 2 * sum(unique.values()) == 2 * 8_030_261_248  # Meta-Llama-3-8B's parameter count


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("max_length", [5, 20, 301])
@pytest.mark.parametrize("offload", [False, True])
def test_cache_is_what_the_cache_allocates(policy, max_length, offload):
    config = small_config(policy)
    for batch, dtype in [(1, torch.float32), (3, torch.bfloat16)]:
        cache = SegmentKVCache(
            config.policy_table(), batch_size=batch, max_length=max_length, segment_size=config.segment_size,
            num_heads=config.num_heads, head_dim=config.head_dim, dtype=dtype, device="cpu", offload_history=offload,
        )  # fmt: skip
        got = decoding_memory(config, batch, max_length, dtype=dtype, offload_history=offload)
        assert got.cache == cache.memory_bytes() == sum(t.nbytes for lay in cache.layers for t in (lay.k, lay.v))
        assert got.host == cache.offloaded_bytes()


def test_cache_is_what_the_engine_allocates():
    config = small_config([["all", "none", "sink:2+window:9", "none"], "window:20"])
    torch.manual_seed(0)
    engine = SegmentedEngine(LlamaForCausalLM(config), decode="eager")
    cache = engine.new_cache(2, 250)
    assert decoding_memory(config, 2, 250, dtype=torch.float32).cache == cache.memory_bytes()


# prefill_chunk, offload_history, and GiB beyond the weights and the cache at the peak
H100_PREFILL = [
    (1024, False, 4.8648 - 4.7510),
    (4096, False, 5.2062 - 4.7510),
    (1024, True, 1.4050 - 1.0001),
    (4096, True, 1.5724 - 1.0001),
]


@pytest.mark.parametrize("chunk, offload, measured_working_gib", H100_PREFILL)
def test_working_memory_covers_prefill_measured_on_an_h100(chunk, offload, measured_working_gib):
    """Peak beyond the weights and the cache of a 128K prefill at 8B shape, 25% of heads ``all``, batch 1
    (docs/bench/prefill_h100_8b_128k_chunk{1024,4096}.json): the estimate is above it, by little."""
    config = load_model_config("llama3-8b")
    got = decoding_memory(config, 1, 131072, prefill_chunk=chunk, offload_history=offload).working / GIB
    assert measured_working_gib <= got <= measured_working_gib + 0.3


def test_memory_grows_linearly_with_the_batch():
    config = load_model_config("llama3-8b")
    one, five = (decoding_memory(config, b, 32768 + 256) for b in (1, 5))
    assert five.weights == one.weights and five.cache == 5 * one.cache and five.working == 5 * one.working


@pytest.mark.parametrize("weights_on_device", [False, True])
@pytest.mark.parametrize("policy", ["none", {"fraction": 0.25}, "sink:4+window:1024"], ids=str)
def test_largest_batch_is_the_boundary_of_what_fits(weights_on_device, policy):
    config = dataclasses.replace(load_model_config("llama3-8b"), history_policy=policy)
    length = 131072 + 512
    for free_gib in (14.0, 17.3, 39.5, 78.5, 139.0):
        free = int(free_gib * GIB)
        n = largest_batch(config, length, free, weights_on_device=weights_on_device)
        need = lambda b: decoding_memory(config, b, length).device(weights_on_device) + RESERVE_BYTES  # noqa: E731
        if n:
            assert need(n) <= free
            assert check_batch_fits(config, n, length, free, weights_on_device=weights_on_device).cache > 0
        assert need(n + 1) > free
        with pytest.raises(BatchTooLarge):
            check_batch_fits(config, n + 1, length, free, weights_on_device=weights_on_device)


def test_128k_batch_16_on_an_80gb_card_says_which_batch_fits():
    config = load_model_config("llama3-8b")  # 25% of KV heads `all`: 4.75 GiB of cache per sequence at 128K
    free = int(78.5 * GIB)  # an H100 80GB before the weights are loaded
    with pytest.raises(UserError) as raised:
        check_batch_fits(config, 16, 131072 + 256, free)
    message = str(raised.value)
    per_row = decoding_memory(config, 1, 131072 + 256)
    fits = math.floor((free - RESERVE_BYTES - per_row.weights) / (per_row.cache + per_row.working))
    assert fits == 12 and "\n" not in message
    assert message.startswith("batch 16 at 131328 positions needs 94.") and message.endswith("free: at most batch 12 fits")
    # every head `none`: two segments per head, and batch 16 fits
    none = dataclasses.replace(config, history_policy="none")
    assert check_batch_fits(none, 16, 131072 + 256, free).cache == 16 * 32 * (8 * 8192 + 1) * 2 * 128 * 2
    with pytest.raises(BatchTooLarge, match="no batch fits: shorten the sequences or offload the history"):
        check_batch_fits(config, 1, 131072 + 256, int(16 * GIB))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="batch and max_length must be >= 1"):
        decoding_memory(load_model_config("tiny"), 0, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_estimate_covers_a_generation_on_the_gpu():
    """Prefill and graph-captured decoding at 1B shape, 8K tokens, batch 4: the cache is what was estimated, and the
    peak beyond the weights is under the estimate of cache and working memory, by less than a quarter."""
    config = load_model_config("llama3.2-1b", {"segment_size": 1024})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    engine = SegmentedEngine(model)
    batch, prompt, new = 4, 8192, 32
    prompts = torch.randint(0, config.vocab_size, (batch, prompt)).tolist()
    engine.generate([p[:64] for p in prompts], max_new_tokens=new)  # compiles first: its buffers are not the estimate's
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = engine.generate(prompts, max_new_tokens=new)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    need = decoding_memory(config, batch, prompt + new, prefill_chunk=engine.prefill_chunk)
    assert out.cache_bytes == need.cache
    assert peak <= need.cache + need.working <= 1.25 * peak, (peak / GIB, need)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_refuses_a_batch_that_cannot_fit_before_allocating():
    """A cache far beyond the card: one line naming the batch that fits, and nothing allocated for it."""
    from segtrain.inference.memory import BatchTooLarge

    config = load_model_config("llama3.2-1b", {"segment_size": 1024, "history_policy": "all"})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    engine = SegmentedEngine(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(BatchTooLarge, match=r"^batch 4096 at 131072 positions needs .* at most batch \d+ fits$"):
        engine.new_cache(4096, 131072)
    assert torch.cuda.memory_allocated() == before
