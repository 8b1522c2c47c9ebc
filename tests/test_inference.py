import argparse
import json
import random

import pytest
import torch

from segtrain.attention import filled_slots, segment_block_attention
from segtrain.checkpoint import save_pretrained
from segtrain.config import ModelConfig
from segtrain.inference import Block, HeadLayout, SegmentedEngine, lower_right_sdpa, sample_next, slot_positions, store_slots
from segtrain.inference import cli as generate_cli
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import HeadPolicy, history_end

POOL = ["none", "all", "sink:1", "sink:3", "window:2", "window:7", "sink:2+window:3", "sink:9+window:1"]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def random_model(seed: int, dtype=torch.float64, **overrides):
    """A random tiny model: GQA or not, random per-(layer, KV head) policies, small segments."""
    rng = random.Random(seed)
    kv = rng.choice([1, 2, 3])
    heads = kv * rng.choice([1, 2])
    layers = rng.choice([1, 2, 3])
    fields = dict(
        vocab_size=rng.choice([37, 64]),
        hidden_size=24,
        intermediate_size=40,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=rng.choice([4, 8]),
        segment_size=rng.choice([1, 2, 3, 5, 8]),
        history_policy=[[rng.choice(POOL) for _ in range(kv)] for _ in range(layers)],
        initializer_range=0.3,
        tie_word_embeddings=rng.random() < 0.5,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(ModelConfig(**fields)).to(dtype).eval()


def parallel_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor([ids]))[0]


# ---- prefill equals the parallel forward ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(8))
def test_segmented_prefill_equals_parallel_forward(seed, dtype):
    model = random_model(seed, dtype)
    rng = random.Random(100 + seed)
    T = rng.randint(1, 33)
    ids = [rng.randrange(model.config.vocab_size) for _ in range(T)]
    expected = parallel_logits(model, ids)
    variants = [
        dict(),
        dict(prefill_chunk=rng.randint(1, 4)),
        dict(sdpa_prefill=True),
        dict(offload_history=True, sdpa_prefill=rng.random() < 0.5),
    ]
    for kwargs in variants:
        engine = SegmentedEngine(model, **kwargs)
        got = engine.prefill(engine.new_cache(1, T), [ids], all_logits=True)[0]
        torch.testing.assert_close(got, expected, **TOL[dtype], msg=lambda m, kw=kwargs: f"{kw}: {m}")
        last = engine.prefill(engine.new_cache(1, T), [ids])
        torch.testing.assert_close(last[0], expected[-1], **TOL[dtype])


# ---- decoding equals re-running the parallel forward ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_decoding_equals_parallel_forward_on_the_grown_sequence(seed, dtype):
    model = random_model(seed, dtype)
    rng = random.Random(200 + seed)
    ids = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 12))]
    n_new = 14  # crosses several segment boundaries for every segment size in random_model
    engine = SegmentedEngine(model, offload_history=seed % 2 == 1)
    out = engine.generate([ids], max_new_tokens=n_new, return_logits=True)
    seq = list(ids)
    for step, token in enumerate(out.tokens[0]):
        expected = parallel_logits(model, seq)[-1]
        torch.testing.assert_close(out.step_logits[step][0].to(dtype), expected, **TOL[dtype])
        assert token == int(expected.argmax())
        seq.append(token)
    assert len(out.tokens[0]) == n_new and out.finish_reasons == ["length"]


@pytest.mark.parametrize("seed", range(3))
def test_batch_of_different_lengths_equals_each_prompt_alone(seed):
    model = random_model(seed + 10, torch.float64)
    rng = random.Random(seed)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (rng.randint(1, 4), 17, rng.randint(5, 12), 1)]
    for kwargs in (dict(), dict(sdpa_prefill=True, offload_history=True)):
        engine = SegmentedEngine(model, **kwargs)
        batched = engine.generate(prompts, max_new_tokens=9, return_logits=True)
        for row, prompt in enumerate(prompts):
            alone = engine.generate([prompt], max_new_tokens=9, return_logits=True)
            assert batched.tokens[row] == alone.tokens[0]
            for a, b in zip(batched.step_logits, alone.step_logits):
                torch.testing.assert_close(a[row], b[0], **TOL[torch.float64])


# ---- what the cache holds ------------------------------------------------------------------------


def expected_held(policy: HeadPolicy, last: int, S: int) -> list[int]:
    """Keys a head must keep once the token at ``last`` has been processed: what queries in its segment read."""
    keep = []
    for lo, hi in policy.retained_ranges(last // S, S):
        keep += range(lo, last + 1 if hi is None else min(hi, last + 1))
    return keep


class Recorder(torch.nn.Module):
    """Fills an attention slot in a parallel forward: keeps the layer's K/V (after RoPE), then attends as usual."""

    def __init__(self, original, store):
        super().__init__()
        self.inner, self.store = original, store

    def forward(self, q, k, v):
        self.store[self.inner.layer] = (k[0], v[0])
        return self.inner(q, k, v)


def recorded_kv(model, ids) -> dict:
    store = {}
    with torch.no_grad(), filled_slots(model, lambda slot: Recorder(slot, store)):
        model(torch.as_tensor([ids]))
    return store


@pytest.mark.parametrize("offload", [False, True])
def test_cache_holds_exactly_what_the_policy_can_still_read(offload):
    """After every prefill block and decoding step: the readable positions are the policy's, and each holds the K/V
    the parallel forward computes for it (rows at different positions, ring slots overwritten many times)."""
    S = 4
    policies = [["none", "all", "sink:2", "window:3"], ["sink:1+window:5", "none", "all", "sink:6+window:2"]]
    model = random_model(3, torch.float64, num_layers=2, num_kv_heads=4, num_heads=8, segment_size=S, history_policy=policies)
    engine = SegmentedEngine(model, offload_history=offload, prefill_chunk=3)
    lengths = [14, 6]
    T = 30
    cache = engine.new_cache(2, T)
    tokens = torch.randint(0, model.config.vocab_size, (2, T))
    done = [0, 0]
    sequences = [tokens[row, :n].tolist() + [int(tokens[row, 0])] * (T - n) for row, n in enumerate(lengths)]
    reference = [recorded_kv(model, seq) for seq in sequences]

    def check():
        for layer, row_policies in enumerate(model.model.policies.layers):
            for h, policy in enumerate(row_policies):
                for row in range(2):
                    held = cache.held_positions(layer, h, row)
                    assert held == expected_held(policy, done[row] - 1, S), (layer, h, row, str(policy))
                    assert len(held) <= (done[row] if policy.all else policy.sink + policy.window + 2 * S)
                    k_ref, v_ref = reference[row][layer]
                    for p in held[:: max(1, len(held) // 3)] + held[-1:]:
                        k, v = cache.key_value(layer, h, row, p)
                        torch.testing.assert_close(k, k_ref[h, p], rtol=1e-12, atol=1e-12)
                        torch.testing.assert_close(v, v_ref[h, p], rtol=1e-12, atol=1e-12)

    start = 0
    while start < max(lengths):  # prefill in blocks that never cross a segment boundary
        stop = min(start + 3, (start // S + 1) * S, max(lengths))
        counts = tuple(max(0, min(n, stop) - start) for n in lengths)
        engine.step(cache, tokens[:, start:stop], Block((start, start), counts))
        done = [d + c for d, c in zip(done, counts)]
        check()
        start = stop
    for _ in range(T - max(lengths)):  # decode one token per row, the rows at different positions
        engine.step(cache, tokens[:, :1], Block(tuple(done), (1, 1)))
        done = [d + 1 for d in done]
        check()
    assert cache.capacity(0, 0) == 2 * S  # a 'none' head's buffer is two segments
    assert cache.capacity(0, 2) == 2 + 2 * S
    assert cache.capacity(0, 1) == (2 * S if offload else T)


@pytest.mark.parametrize("seed", range(12))
def test_slot_layout_finds_every_readable_position(seed):
    """Write positions 0, 1, ... into a head's slots one at a time; after each, the slots that ``slot_positions`` marks
    readable hold exactly the positions the policy still reads (simulated independently with a dict)."""
    rng = random.Random(seed)
    S, M = rng.choice([1, 2, 3, 5]), rng.randint(1, 40)
    policy = HeadPolicy.parse(rng.choice(POOL))
    layout = HeadLayout.for_policy(policy, S, M, offload=rng.random() < 0.3 and policy.all)
    heads = torch.tensor([[layout.offset], [layout.linear], [layout.ring], [layout.window]], dtype=torch.int32)
    held: dict[int, int] = {}
    for last in range(M):
        slot = int(store_slots(heads, torch.tensor([[last]]), trash=-7)[0, 0, 0])
        assert 0 <= slot < layout.capacity
        held[slot] = last
        got = slot_positions(layout, torch.tensor([last]), S)[0].tolist()
        readable = {p for p in got if 0 <= p <= last}
        if layout.linear == 0 and policy.all:  # offloaded 'all': the device keeps the local segments only
            expected = set(range(history_end(last // S, S), last + 1))
        else:
            expected = set(expected_held(policy, last, S))
        assert readable == expected, (str(policy), S, M, last)
        assert all(held.get(s) == p for s, p in enumerate(got) if 0 <= p <= last)
    assert int(store_slots(heads, torch.tensor([[-1]]), trash=-7)) == -7  # padding goes to the trash slot


def test_none_heads_memory_does_not_grow_with_length():
    def cache_bytes(policy, max_length):
        model = random_model(0, torch.float32, num_kv_heads=2, num_heads=2, segment_size=8, history_policy=policy)
        return SegmentedEngine(model).new_cache(1, max_length).memory_bytes()

    assert cache_bytes("none", 64) == cache_bytes("none", 4096)
    assert cache_bytes("all", 4096) > 50 * cache_bytes("none", 4096)
    model = random_model(0, torch.float32, num_kv_heads=2, num_heads=2, segment_size=8, history_policy="all")
    cache = SegmentedEngine(model, offload_history=True).new_cache(1, 4096)
    assert cache.memory_bytes() == cache_bytes("none", 4096) and cache.offloaded_bytes() > 0


def test_block_errors():
    model = random_model(1, torch.float32, segment_size=4)
    engine = SegmentedEngine(model)
    cache = engine.new_cache(1, 8)
    with pytest.raises(ValueError, match="crosses a segment boundary"):
        engine.step(cache, torch.zeros(1, 3, dtype=torch.long), Block((2,), (3,)))
    with pytest.raises(RuntimeError, match="max_length"):
        engine.step(cache, torch.zeros(1, 2, dtype=torch.long), Block((8,), (2,)))


# ---- the SDPA prefill layout ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_lower_right_sdpa_layout_equals_segment_block_attention(seed):
    rng = random.Random(seed)
    B, Hkv, D, S = rng.choice([1, 2]), rng.choice([1, 2]), 8, rng.choice([3, 4, 7])
    Hq = Hkv * rng.choice([1, 3])
    policy = HeadPolicy.parse(rng.choice(POOL))
    s = rng.randint(0, 5)
    a, b = s * S, s * S + rng.randint(1, S)  # a query block at the start of segment s, maybe partial
    g = torch.Generator().manual_seed(seed)
    k_all, v_all = (torch.randn(B, Hkv, b, D, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, Hq, b - a, D, generator=g, dtype=torch.float64)
    end = history_end(s, S)
    hist = [j for lo, hi in policy.history_ranges(end) for j in range(lo, hi)]
    expected, _ = segment_block_attention(
        q,
        k_all[:, :, end:b],
        v_all[:, :, end:b],
        k_all[:, :, hist],
        v_all[:, :, hist],
        q_positions=range(a, b),
        local_positions=range(end, b),
    )
    layout = hist + list(range(end, b))  # [history, previous segment, current segment]
    got = lower_right_sdpa(q, k_all[:, :, layout], v_all[:, :, layout])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---- sampling, stop tokens, CLI ------------------------------------------------------------------


def test_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 2.9]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(i)) for i in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 2} and set(draws[:, 1].tolist()) == {0, 3}

    model = random_model(4, torch.float32)
    engine = SegmentedEngine(model)
    runs = [engine.generate([[1, 2, 3]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(0 <= t < model.config.vocab_size for t in runs[0][0])


def test_stop_tokens_end_a_row_and_are_not_returned():
    model = random_model(5, torch.float64)
    engine = SegmentedEngine(model)
    free = engine.generate([[3, 1], [4]], max_new_tokens=10)
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    out = engine.generate([[3, 1], [4]], max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:first] and out.finish_reasons[0] == "stop"
    if stop not in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1] and out.finish_reasons[1] == "length"


def test_generate_cli_from_a_checkpoint(tmp_path, capsys):
    model = random_model(6, torch.float32)
    save_pretrained(model, model.config, tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(tmp_path / "ckpt"),
            "--prompt-ids",
            "1,2,3",
            "--prompt-ids",
            "4 5",
            "--max-new-tokens",
            "6",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert generate_cli.run(args) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    expected = SegmentedEngine(model).generate([[1, 2, 3], [4, 5]], max_new_tokens=6).tokens
    assert [r["tokens"] for r in rows] == expected
    assert "tokens/s" in captured.err
    # one prompt without --json streams its tokens as they come (ids without a tokenizer)
    args = parser.parse_args(["--model", str(tmp_path / "ckpt"), "--prompt-ids", "1,2,3", "--max-new-tokens", "6"])
    assert generate_cli.run(args) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected[0]]
    args = parser.parse_args(["--model", str(tmp_path / "missing"), "--prompt-ids", "1"])
    assert generate_cli.run(args) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_decoding_crosses_many_segments_with_bounded_cache():
    S = 2
    model = random_model(7, torch.float64, segment_size=S, num_kv_heads=1, num_heads=2, history_policy="none")
    engine = SegmentedEngine(model)
    out = engine.generate([[1, 2, 3]], max_new_tokens=25, return_logits=True)
    seq = [1, 2, 3]
    for step, token in enumerate(out.tokens[0]):
        torch.testing.assert_close(out.step_logits[step][0].double(), parallel_logits(model, seq)[-1], **TOL[torch.float64])
        seq.append(token)
    bytes_per_slot = 2 * model.config.head_dim * 8 * model.config.num_layers  # K and V, float64
    assert out.cache_bytes == bytes_per_slot * (2 * S + 1)  # K/V of two segments, plus the slot padding goes to


def test_prefill_feeds_one_segment_at_a_time_and_projects_only_the_last_logits():
    model = random_model(8, torch.float32, segment_size=8)
    widths, heads = [], []
    model.model.embed_tokens.register_forward_hook(lambda module, inputs, out: widths.append(out.shape[1]))
    model.lm_head.register_forward_hook(lambda module, inputs, out: heads.append(tuple(out.shape)))
    engine = SegmentedEngine(model)
    engine.prefill(engine.new_cache(2, 30), [list(range(30)), list(range(11))])
    assert widths == [8, 8, 8, 6] and heads == [(2, model.config.vocab_size)]


# ---- the decoding step: attention paths, compiled layers, streaming -------------------------------


def mixed_model(dtype=torch.float64, **overrides):
    fields = dict(num_layers=3, num_kv_heads=3, num_heads=6, segment_size=4, head_dim=8)
    fields["history_policy"] = [["all", "none", "sink:1+window:2"], ["none", "none", "window:3"], ["sink:2", "all", "all"]]
    fields.update(overrides)
    return random_model(11, dtype, **fields)


def test_decode_attention_paths_and_compiled_layers_agree():
    """The decoding step with masked SDPA, with ``torch.compile``d layers (a counting backend), and the exact path give the
    same logits over prompts of different lengths across segment boundaries; a second generation compiles nothing new."""
    model = mixed_model()
    prompts = [[5, 1, 7, 2, 9, 3, 4], [8], [2, 6, 1, 1, 3, 5, 7, 9, 11, 13]]
    reference = SegmentedEngine(model, decode_attention="torch").generate(prompts, max_new_tokens=11, return_logits=True)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for engine in (SegmentedEngine(model, decode_attention="sdpa"), SegmentedEngine(model, compile_decode=counting)):
        out = engine.generate(prompts, max_new_tokens=11, return_logits=True)
        assert out.tokens == reference.tokens
        for a, b in zip(out.step_logits, reference.step_logits):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    compiled = len(graphs)
    assert compiled > 0  # the layers ran compiled (split around the attention call, which stays eager)
    SegmentedEngine(model, compile_decode=counting).generate([[3, 3], [1], [4, 4, 4]], max_new_tokens=5)
    assert len(graphs) == compiled  # same shapes: the compiled layers are reused, whatever cache they run with


def test_streaming_reports_each_step_as_it_comes():
    model = mixed_model(torch.float32)
    engine = SegmentedEngine(model)
    free = engine.generate([[1, 2, 3], [4]], max_new_tokens=9)
    stop = free.tokens[1][2]
    seen = []
    out = engine.generate([[1, 2, 3], [4]], max_new_tokens=9, stop_tokens=[stop], on_tokens=seen.append)
    for row in range(2):
        assert [step[row] for step in seen if step[row] is not None] == out.tokens[row]
    first_stop = free.tokens[1].index(stop)
    assert all(step[1] is None for step in seen[first_stop:])  # a stopped row reports nothing more
    assert out.decode_steps == len(seen) - 1 and out.decode_tokens_per_s > 0 and out.prefill_s > 0


# ---- the model serves the engine -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_the_layer_steps_with_the_slots_as_attention_are_the_training_forward(seed):
    """``embed``, each of ``layer_steps`` with the layer's own slot as attention, then ``logits``: the parallel forward,
    bit for bit (the same calls in the same order), at absolute positions of random rows."""
    from segtrain.attention import attention_slots

    model = random_model(seed)
    ids = torch.randint(model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    positions = torch.stack([torch.arange(13), torch.arange(13) + 5])
    with torch.no_grad():
        x, rope = model.embed(ids, positions)
        for step, (_, slot) in zip(model.layer_steps(), attention_slots(model), strict=True):
            x = step(x, rope, slot)
        assert torch.equal(model.logits(x), model(ids, position_ids=positions))


def test_the_engine_leaves_the_model_alone_and_reads_the_policy_from_its_one_holder():
    from segtrain.attention import SegmentAttention, attention_slots

    model = mixed_model()
    seen = set()
    for layer in model.model.layers:  # what each layer's slot holds while the engine runs it
        layer.mlp.register_forward_hook(lambda m, a, out, layer=layer: seen.add(type(layer.self_attn.core_attention)))
    SegmentedEngine(model).generate([[5, 1, 7, 2, 9], [8]], max_new_tokens=3)
    assert seen == {SegmentAttention}
    assert model.policies == model.config.policy_table()
    attention_slots(model)[1][1].policy = (HeadPolicy.parse("all"),) * 3  # the slot holds the policy; the cache follows it
    cache = SegmentedEngine(model).new_cache(1, 16)
    assert cache.policies == model.policies and cache.policies[1] == (HeadPolicy.parse("all"),) * 3
    assert cache.policies[0] == model.config.policy_table()[0]
