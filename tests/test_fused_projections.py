"""``LlamaForCausalLM.fuse_projections``: each layer's q|k|v and gate|up weights in one tensor, one GEMM each.

Float64 on CPU: the fused model's logits, prefill and decoding equal the unfused model's (GQA and tied embeddings);
the parameters are views of the fused weights (one copy in memory); state-dict names and values, saving and loading
are unchanged; a forward with gradients refuses; ``.to()``, copies and ZeRO are handled. GPU
(``pytest -m gpu tests/test_fused_projections.py``): the graph-captured engine gives the same tokens fused and unfused.
"""

import functools
import weakref

import pytest
import torch
from tiny_models import make_model, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from segtrain.checkpoint import save_pretrained
from segtrain.inference import SegmentedEngine
from segtrain.models.llama import LlamaForCausalLM

EXACT = dict(rtol=1e-12, atol=1e-12)  # float64: one GEMM on the stacked weights against three

config = functools.partial(tiny_config, num_heads=6, num_kv_heads=2)  # GQA: k and v narrower than q


def spread_weights(model: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """Norm weights away from 1, so the fused GEMM's input is not a plain normalised vector."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def model_pair(seed: int, **fields) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """The same random float64 weights twice: unfused, and fused."""
    plain = spread_weights(make_model(config(**fields), seed, torch.float64), seed)
    fused = make_model(config(**fields), seed + 100, torch.float64)
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    return plain, fused


def fused_weights(model: LlamaForCausalLM) -> list[tuple]:
    return [(layer.self_attn.qkv_weight, layer.mlp.gate_up_weight) for layer in model.model.layers]


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_fused_logits_equal_the_unfused(seed, tied):
    plain, fused = model_pair(seed, tie_word_embeddings=tied)
    assert fused.projections_fused and not plain.projections_fused
    ids = torch.randint(plain.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = plain(ids), fused(ids)
    assert expected.abs().max() > 1  # spread logits: a wrong split would show
    torch.testing.assert_close(got, expected, **EXACT)
    if tied:
        assert fused.lm_head.weight is fused.model.embed_tokens.weight


def test_the_parameters_are_views_of_the_fused_weights_one_copy_in_memory():
    plain, fused = model_pair(0)
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for part in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert storage_ptr(part.weight) == storage_ptr(attn.qkv_weight)
        for part in (mlp.gate_proj, mlp.up_proj):
            assert storage_ptr(part.weight) == storage_ptr(mlp.gate_up_weight)
        hidden = fused.config.hidden_size
        assert attn.qkv_weight.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, hidden)
        assert mlp.gate_up_weight.shape == (2 * fused.config.intermediate_size, hidden)
        assert torch.equal(attn.qkv_weight[: attn.q_proj.out_features], attn.q_proj.weight)
        assert torch.equal(mlp.gate_up_weight[fused.config.intermediate_size :], mlp.up_proj.weight)
    storages = {storage_ptr(p): p.untyped_storage().nbytes() for p in fused.parameters()}
    assert sum(storages.values()) == sum(p.numel() * p.element_size() for p in fused.parameters())  # nothing twice
    before = fused_weights(fused)
    fused.fuse_projections()  # again: nothing changes
    assert all(a is b for pair in zip(before, fused_weights(fused), strict=True) for a, b in zip(*pair, strict=True))


def test_state_dict_save_and_load_are_unchanged(tmp_path):
    plain, fused = model_pair(1)
    expected, got = plain.state_dict(), fused.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for name, model in (("plain", plain), ("fused", fused)):
        save_pretrained(model, model.config, tmp_path / name)
    assert (tmp_path / "plain/model.safetensors").read_bytes() == (tmp_path / "fused/model.safetensors").read_bytes()
    other = spread_weights(make_model(config(), 7, torch.float64), 7)  # loading into a fused model fills the fused weights
    fused.load_state_dict(other.state_dict())
    ids = torch.randint(other.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), other(ids), **EXACT)
    assert storage_ptr(fused.model.layers[1].mlp.up_proj.weight) == storage_ptr(fused.model.layers[1].mlp.gate_up_weight)


def test_a_model_loaded_from_a_fused_one_shares_its_fused_weights():
    """``load_state_dict(assign=True)`` from a fused model, then fusing: the weights lie back to back, nothing is copied."""
    plain, fused = model_pair(6)
    other = make_model(config(), 9, torch.float64)
    other.load_state_dict(fused.state_dict(), assign=True)
    other.fuse_projections()
    for a, b in zip(fused_weights(other), fused_weights(fused), strict=True):
        assert [storage_ptr(t) for t in a] == [storage_ptr(t) for t in b] and all(map(torch.equal, a, b))
    ids = torch.randint(plain.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), plain(ids), **EXACT)
    unrelated = make_model(config(), 10, torch.float64)  # weights in their own tensors: copied into a new one
    unrelated.fuse_projections()
    assert storage_ptr(unrelated.model.layers[0].self_attn.qkv_weight) != storage_ptr(fused.model.layers[0].self_attn.qkv_weight)


def test_a_forward_with_gradients_refuses_until_unfused():
    plain, fused = model_pair(2)
    ids = torch.randint(plain.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="unfuse_projections"):
        fused(ids, labels=ids)
    fused.unfuse_projections()
    assert not fused.projections_fused
    assert len({storage_ptr(p) for p in fused.parameters()}) == len(list(fused.parameters()))
    torch.testing.assert_close(fused(ids, labels=ids), plain(ids, labels=ids), **EXACT)


def test_to_keeps_the_model_fused_on_its_new_tensors():
    plain, fused = model_pair(3)
    fused.to(torch.float32)
    plain.to(torch.float32)
    mlp = fused.model.layers[0].mlp
    assert fused.projections_fused and mlp.gate_up_weight.dtype == torch.float32
    assert storage_ptr(mlp.gate_proj.weight) == storage_ptr(mlp.gate_up_weight)
    ids = torch.randint(plain.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_a_copy_of_a_fused_model_is_fused_on_its_own_weights():
    import copy
    import io

    plain, fused = model_pair(8)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert twin.projections_fused
        for layer in twin.model.layers:
            assert storage_ptr(layer.self_attn.v_proj.weight) == storage_ptr(layer.self_attn.qkv_weight)
            assert storage_ptr(layer.mlp.up_proj.weight) == storage_ptr(layer.mlp.gate_up_weight)
        assert storage_ptr(twin.model.layers[0].self_attn.qkv_weight) != storage_ptr(fused.model.layers[0].self_attn.qkv_weight)
        other = spread_weights(make_model(config(), 12, torch.float64), 12)
        twin.load_state_dict(other.state_dict())  # reaches the fused weights
        ids = torch.randint(other.config.vocab_size, (1, 15), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            torch.testing.assert_close(twin(ids), other(ids), **EXACT)


def test_deepspeed_managed_parameters_are_refused():
    model = make_model(config(), 0, torch.float64)
    assert not model.zero_managed
    model.model.layers[0].self_attn.q_proj.weight.ds_id = 0  # what ZeRO marks its parameters with
    assert model.zero_managed  # the engine's CUDA default then leaves the model unfused
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        model.fuse_projections()
    assert not model.projections_fused


@pytest.mark.parametrize("decode_attention, sdpa_prefill", [("torch", False), ("sdpa", True)])
def test_engine_prefill_and_decoding_equal_before_and_after_fusing(decode_attention, sdpa_prefill):
    """Prompts of different lengths across segment boundaries: the same tokens and the same logits at every step."""
    plain, fused = model_pair(4, segment_size=8, tie_word_embeddings=True)
    prompts = [[5, 1, 7, 2, 9, 3, 4, 11, 13, 2, 8], [8], [2, 6, 1, 1, 3, 5, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]]
    engines = [
        SegmentedEngine(model, decode_attention=decode_attention, sdpa_prefill=sdpa_prefill, fuse_projections=fuse)
        for model, fuse in ((plain, False), (fused, True))
    ]
    assert engines[0].model.projections_fused is False and engines[1].model.projections_fused is True
    cache = [e.new_cache(len(prompts), 64) for e in engines]
    prefill = [e.prefill(c, prompts) for e, c in zip(engines, cache)]
    torch.testing.assert_close(prefill[1], prefill[0], **EXACT)
    expected, got = (e.generate(prompts, max_new_tokens=12, return_logits=True) for e in engines)
    assert got.tokens == expected.tokens
    for a, b in zip(got.step_logits, expected.step_logits, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def test_engine_fuses_on_cuda_or_when_asked():
    model = make_model(config(), 0, torch.float64)
    SegmentedEngine(model)
    assert not model.projections_fused  # CPU: off unless asked
    SegmentedEngine(model, fuse_projections=False)
    assert not model.projections_fused
    SegmentedEngine(model, fuse_projections=True)
    assert model.projections_fused


def test_compiled_layers_read_the_fused_weights_without_graph_breaks():
    """The engine's ``torch.compile``d layer steps (a counting backend): the same logits, and no more graphs than unfused
    (a graph break in the fused path would add some)."""
    plain, fused = model_pair(5, segment_size=8)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7]]
    graphs = {"plain": [], "fused": []}

    def counting(name):
        def backend(gm, example_inputs):
            graphs[name].append(gm)
            return gm.forward

        return backend

    expected = SegmentedEngine(plain, compile_decode=counting("plain"), fuse_projections=False)
    got = SegmentedEngine(fused, compile_decode=counting("fused"), fuse_projections=True)
    expected, got = (e.generate(prompts, max_new_tokens=6, return_logits=True) for e in (expected, got))
    assert got.tokens == expected.tokens
    for a, b in zip(got.step_logits, expected.step_logits, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    assert 0 < len(graphs["fused"]) == len(graphs["plain"])


# ---- GPU: the graph-captured, compiled decoding step (pytest -m gpu tests/test_fused_projections.py) --------------


def gpu_model(dtype, **overrides) -> LlamaForCausalLM:
    fields = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8, num_kv_heads=4,
                  head_dim=64, segment_size=16, attention_backend="math", initializer_range=0.05,
                  history_policy=[["all", "none", "sink:2+window:8", "window:16"]] * 3)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**{**fields, **overrides})).to("cuda", dtype).eval()


def first_differences(got, expected) -> list[tuple[int, int]]:
    """(row, step) of each row's first token that differs (rows that never differ are left out)."""
    out = []
    for row, (a, b) in enumerate(zip(got.tokens, expected.tokens, strict=True)):
        k = next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if k is not None:
            out.append((row, k))
    return out


class LiveBytes(TorchDispatchMode):
    """The most bytes that tensors made inside it held at once (storages: a view keeps its base's alive)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def _free(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or (key := t.untyped_storage().data_ptr()) in inputs:
                continue  # a view of a weight or of the input: not made here
            if key not in self.storages:
                storage = t.untyped_storage()
                self.storages.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def test_the_fused_mlp_holds_no_more_than_the_unfused_one():
    """A prefill block's MLP (wide, so that one more [tokens, hidden] tensor shows): fused, the gate|up output is freed
    before down's output is made, so the peak is the unfused one's three [tokens, intermediate] tensors. (On an H100
    the fused engine once held one [tokens, hidden] more than the memory estimate allows.)"""
    plain, fused = model_pair(9, hidden_size=64, intermediate_size=256)
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    peaks = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("fused", fused)):
            mlp = model.model.layers[0].mlp
            with LiveBytes() as live:
                out = mlp(x)
            peaks[name] = live.peak
            del out
    intermediate = 2 * 40 * 256 * 8
    assert peaks["plain"] == 3 * intermediate  # gate's silu, up, their product
    assert peaks["fused"] <= peaks["plain"], peaks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_gives_the_same_tokens_with_and_without_fusing(dtype):
    """The default CUDA engine (CUDA graph, Inductor, Triton split-KV) on prompts of different lengths, 40 tokens across
    segment boundaries. fp32: the same tokens. bf16: the same tokens, except that a row may part where the unfused
    step's top two logits are closer than bf16 rounding can tell apart (then the logits up to there agree)."""
    plain, fused = gpu_model(dtype), gpu_model(dtype)
    prompts = [[(7 * i + 3 * n) % 512 for i in range(n)] for n in (37, 5, 64, 20)]
    engines = [SegmentedEngine(plain, fuse_projections=False), SegmentedEngine(fused)]  # the CUDA default fuses
    assert fused.projections_fused and not plain.projections_fused
    expected, got = (e.generate(prompts, max_new_tokens=40, return_logits=True) for e in engines)
    assert all(e.decode == "graph" and e.compile_backend == "inductor" for e in engines), "compile fell back (see warning)"
    if dtype == torch.float32:
        assert got.tokens == expected.tokens
        return
    scale = max(step.float().abs().max().item() for step in expected.step_logits)
    for row, k in first_differences(got, expected):
        top2 = expected.step_logits[k][row].float().topk(2).values
        assert top2[0] - top2[1] < 0.02 * scale, f"row {row} parts at step {k} on a clear choice ({top2.tolist()})"
    for k, (a, b) in enumerate(zip(got.step_logits, expected.step_logits, strict=True)):
        same = [row for row in range(len(prompts)) if got.tokens[row][:k] == expected.tokens[row][:k]]  # same inputs
        torch.testing.assert_close(a[same].float(), b[same].float(), rtol=0.05, atol=0.05 * scale)


@pytest.mark.gpu
def test_fusing_on_the_gpu_allocates_no_second_copy():
    model = gpu_model(torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model.fuse_projections()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
def test_fused_prefill_holds_no_more_working_memory_than_unfused():
    """A prefill block's peak beyond weights and cache: fused at most the unfused one plus one block's q and k before RoPE
    (the fused output stays alive while v, a view of it, does), what the engine's memory estimate already counts. A wide
    MLP, so that one more [tokens, intermediate] tensor alive (SwiGLU not in place) would show."""
    peaks, wide = {}, dict(intermediate_size=4096)
    prompts = [[(5 * i + 1) % 512 for i in range(200)]] * 2
    for fuse in (False, True):
        engine = SegmentedEngine(gpu_model(torch.bfloat16, **wide), fuse_projections=fuse)
        engine.prefill(engine.new_cache(len(prompts), 256), prompts)  # once before: cuBLAS workspaces, kernel tuning
        cache = engine.new_cache(len(prompts), 256)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine.prefill(cache, prompts)
        torch.cuda.synchronize()
        peaks[fuse] = torch.cuda.max_memory_allocated() - base
        del engine, cache
    q_and_k = len(prompts) * 16 * (8 + 4) * 64 * 2  # a 16-token block, bf16: 48 KiB (an intermediate: 256 KiB)
    assert peaks[True] <= peaks[False] + q_and_k + 4096, peaks
