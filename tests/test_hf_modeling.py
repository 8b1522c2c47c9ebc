"""The segment-attention Hugging Face export: transformers, loading ``modeling_segtrain.py`` (a verbatim copy of
``segtrain/checkpoint/hf_modeling.py``) with ``trust_remote_code=True``, runs segtrain's execution. In float64 on CPU:
its logits equal segtrain's segmented forward at every position, its greedy ``generate()`` equals ``segtrain generate``,
its cache holds exactly what each head's policy can still read, its loss and gradients equal segtrain's, and lm-eval's
``hf`` model scores what ``--model segtrain`` scores."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, spread_norms, tiny_config

from segtrain.attention.reference import visibility_masks
from segtrain.checkpoint import hf, hf_modeling, load_config, save_pretrained
from segtrain.convert import from_hf, to_hf
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import HeadPolicy

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
TOL = dict(rtol=1e-10, atol=1e-10)
MIXED = [["all", "sink:2+window:3"], ["none", "window:4"]]


def tiny(seed: int = 0, **fields) -> LlamaForCausalLM:
    """A random float64 model of segtrain (math backend: its segmented forward), norms away from 1."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_heads=4, segment_size=5, history_policy=MIXED,
                attention_backend="math", initializer_range=0.2, max_position_embeddings=256)  # fmt: skip
    return spread_norms(make_model(tiny_config(**{**base, **fields}), seed, torch.float64))


def export(tmp_path, model, name: str = "hf", tokenizer=None):
    save_pretrained(model, model.config, tmp_path / f"{name}_src")
    return to_hf(tmp_path / f"{name}_src", tmp_path / name, tokenizer=tokenizer, progress=False)


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).eval()


def remote(model):
    """The module transformers loaded the export's modeling file as (not segtrain's: the copy in the directory)."""
    return sys.modules[type(model).__module__]


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return ids, mask


# ---- the semantics written twice agree -------------------------------------------------------------------------------

POOL = ["none", "all", "sink:1", "sink:3", "window:2", "window:7", "sink:2+window:3", "window:3+sink:2", "all+sink:4",
        "sink:9+window:1", " none ", "sink:0", "window:-1", "none+all", "sink:2+sink:3", "bogus",
        "all+window:2+sink:1"]  # fmt: skip


def test_policy_grammar_is_segtrains():
    for text in POOL:
        try:
            want = HeadPolicy.parse(text)
        except ValueError:
            with pytest.raises(ValueError, match="bad history policy"):
                hf_modeling.HeadPolicy.parse(text)
            continue
        got = hf_modeling.HeadPolicy.parse(text)
        assert (got.all, got.sink, got.window) == (want.all, want.sink, want.window), text
        assert str(got) == str(want)


@pytest.mark.parametrize("segment_size", [1, 3, 4, 7])
def test_visibility_and_kept_keys_are_the_references(segment_size):
    """``visible`` is the reference's mask; ``kept_layout`` keeps exactly the keys the next query can read."""
    T = 40
    for text in ["none", "all", "sink:1", "sink:5", "window:2", "window:9", "sink:2+window:3", "sink:9+window:1"]:
        policy = hf_modeling.HeadPolicy.parse(text)
        live, hist = visibility_masks(T, segment_size, [HeadPolicy.parse(text)])
        want = live | hist[0]
        t, j = torch.arange(T)[:, None], torch.arange(T)[None]
        assert torch.equal(hf_modeling.visible(policy, t, j, segment_size), want), text
        for last in range(-1, T - 1):
            a, lo = hf_modeling.kept_layout(policy, last, segment_size)
            kept = [p for p in range(last + 1) if p < a or p >= lo]
            assert kept == want[last + 1, : last + 1].nonzero()[:, 0].tolist(), (text, last)


# ---- logits: every position, several policies ------------------------------------------------------------------------

CASES = {
    "sink/window mix, GQA 4/2, S=5 (partial last segment), llama3 RoPE, tied": dict(
        rope_scaling=LLAMA3_ROPE, rope_theta=5e5, tie_word_embeddings=True
    ),
    "GQA 6/3, per-head mix, S=4": dict(
        num_heads=6,
        num_kv_heads=3,
        segment_size=4,
        head_dim=8,
        history_policy=[["sink:1", "none", "all"], ["window:2", "sink:3+window:1", "none"]],
    ),
    "MQA 4/1, S=3, sinks": dict(num_kv_heads=1, segment_size=3, history_policy=[["sink:2"], ["none"]]),
    "MHA 2/2, S=7, all and none": dict(num_heads=2, num_kv_heads=2, head_dim=16, segment_size=7, history_policy="none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_segtrains_segmented_forward(tmp_path, case):
    model = tiny(1, **CASES[case])
    got_model = load(export(tmp_path, model))
    assert got_model.config._attn_implementation == hf_modeling.ATTENTION_NAME
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(got_model(ids).logits, want, **TOL)
        remote(got_model).PREFILL_CHUNK = 2  # blocks inside a segment too
        torch.testing.assert_close(got_model(ids).logits, want, **TOL)
        full = tiny(1, **{**CASES[case], "history_policy": "all"})(ids)
    assert (want - full).abs().max() > 1e-3  # the policy matters here: full attention would fail this test


def test_left_padded_batch_and_continued_cache_equal_each_row_alone(tmp_path):
    model = tiny(2)
    hf_model = load(export(tmp_path, model))
    rng = random.Random(0)
    rows = [[rng.randrange(3, 97) for _ in range(n)] for n in (23, 9, 16)]
    ids, mask = left_padded(rows)
    pad = ids.shape[1] - torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        logits = hf_model(ids, attention_mask=mask).logits
        for r, row in enumerate(rows):
            torch.testing.assert_close(logits[r, pad[r] :], reference_logits(model, row), **TOL)
        # the same batch in two calls: the second continues the cache with rows at different positions
        cut = 14
        first = hf_model(ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
        cache = getattr(first, remote(hf_model).CACHE_ARG)
        assert type(cache).__name__ == "SegmentCache"
        second = hf_model(ids[:, cut:], attention_mask=mask, **{remote(hf_model).CACHE_ARG: cache}).logits
        torch.testing.assert_close(torch.cat([first.logits, second], 1)[mask.bool()], logits[mask.bool()], **TOL)


# ---- generation ------------------------------------------------------------------------------------------------------


def test_greedy_generate_equals_segtrain_generate(tmp_path, capsys):
    """A left-padded batch, 20 new tokens past several segment boundaries (S=4)."""
    from segtrain.inference import cli as generate_cli

    model = tiny(3, segment_size=4, history_policy=[["sink:1+window:2", "none"], ["all", "window:3"]])
    path = export(tmp_path, model)
    rows = [[5, 17, 33, 8, 41, 60, 2 + 9, 70, 12, 3, 44], [7, 81, 19, 26, 52, 90]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = load(path).generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
    parser = __import__("argparse").ArgumentParser()
    generate_cli.add_arguments(parser)
    args = ["--model", str(path), "--max-new-tokens", "20", "--json", "--dtype", "float64", "--stop-ids", "2", "--device", "cpu"]
    for row in rows:
        args += ["--prompt-ids", ",".join(map(str, row))]
    assert generate_cli.run(parser.parse_args(args)) == 0
    want = [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()]
    for r, tokens in enumerate(want):
        got = out[r, ids.shape[1] :].tolist()
        assert got[: len(tokens)] == tokens and len(tokens) > 12
        assert all(t == 0 for t in got[len(tokens) + 1 :])  # stopped where segtrain stopped (EOS, then padding)


def test_cache_holds_exactly_what_each_head_can_still_read(tmp_path):
    """After prefill and decoding, per layer, KV head and row: the positions a later query can read, with their keys."""
    policies = [["none", "sink:2+window:3", "all"], ["window:5", "sink:3", "none"]]
    model = tiny(4, num_heads=6, num_kv_heads=3, segment_size=4, head_dim=8, history_policy=policies)
    hf_model = load(export(tmp_path, model))
    rows = [[11, 23, 5, 67, 31, 8, 90, 14, 3, 52, 29], [40, 6, 77, 18, 64]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=None,
                                pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    cache = getattr(out, remote(hf_model).CACHE_ARG)
    assert type(cache).__name__ == "SegmentCache"
    keys = {}
    hooks = [layer.self_attn.core_attention.register_forward_pre_hook(lambda m, args, i=i: keys.__setitem__(i, args[1]))
             for i, layer in enumerate(model.model.layers)]  # fmt: skip
    for r, row in enumerate(rows):
        fed = row + out.sequences[r, ids.shape[1] : -1].tolist()  # the last new token was never fed
        last = len(fed) - 1
        reference_logits(model, fed)
        for layer, row_policies in enumerate(policies):
            live, hist = visibility_masks(last + 2, 4, [HeadPolicy.parse(p) for p in row_policies])
            for h in range(3):
                readable = (live | hist[h])[last + 1, : last + 1].nonzero()[:, 0]
                positions, k, v = cache.held(layer, h)
                held = positions[r] >= 0
                assert positions[r][held].tolist() == readable.tolist(), (layer, h, r)
                torch.testing.assert_close(k[r][held], keys[layer][0, h, readable], **TOL)
    for hook in hooks:
        hook.remove()
    widths = {p: cache.held(layer, h)[0].shape[1] for layer, row in enumerate(policies) for h, p in enumerate(row)}
    assert widths["none"] <= 2 * 4 and widths["sink:2+window:3"] <= 2 + 3 + 2 * 4  # bounded, whatever the length
    assert widths["all"] == len(rows[0]) + 8


def test_sampling_reads_the_same_logits_as_segtrain(tmp_path):
    """Sampled continuations of a left-padded batch: every step's logits are segtrain's on the sequence so far."""
    model = tiny(5, segment_size=3)
    hf_model = load(export(tmp_path, model))
    rows = [[9, 31, 72, 4, 55, 18, 66, 23], [48, 13, 85]]
    ids, mask = left_padded(rows)
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95,
                                eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
        greedy = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)  # fmt: skip
    assert not torch.equal(out.sequences, greedy)  # it sampled
    for r, row in enumerate(rows):
        grown = row + out.sequences[r, ids.shape[1] :].tolist()
        want = reference_logits(model, grown)[len(row) - 1 : -1].float()  # generate() hands out float32 logits
        torch.testing.assert_close(torch.stack([step[r] for step in out.logits]), want, rtol=1e-6, atol=1e-6)


def test_beam_search_reorders_the_cache(tmp_path):
    """Beam search with the cache (rows reordered every step) chooses what it chooses recomputing every step."""
    hf_model = load(export(tmp_path, tiny(12, segment_size=3)))
    ids, mask = left_padded([[9, 31, 72, 4, 55, 18, 66], [48, 13, 85, 7]])
    beams = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False,
                 eos_token_id=None, pad_token_id=0, length_penalty=0.0)  # fmt: skip
    with torch.no_grad():
        cached = hf_model.generate(ids, **beams)
        recomputed = hf_model.generate(ids, use_cache=False, **beams)
    assert torch.equal(cached, recomputed) and len({tuple(r) for r in cached[:2, ids.shape[1] :].tolist()}) == 2


def test_pipeline_generates_what_segtrain_generates(tmp_path, tiny_tokenizer, capsys):
    from segtrain.inference import cli as generate_cli

    model = tiny(6, vocab_size=400, segment_size=4)
    path = export(tmp_path, model, tokenizer=tiny_tokenizer.model_file)
    pipe = transformers.pipeline("text-generation", model=str(path), trust_remote_code=True, dtype=torch.float64)
    prompt = "def f(x):\n    return x + 1\n"
    got = pipe(prompt, max_new_tokens=10, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    parser = __import__("argparse").ArgumentParser()
    generate_cli.add_arguments(parser)
    args = ["--model", str(path), "--prompt", prompt, "--add-bos", "--max-new-tokens", "10", "--json", "--dtype", "float64"]
    assert generate_cli.run(parser.parse_args(args)) == 0
    want = json.loads(capsys.readouterr().out.splitlines()[0])
    assert got == want["prompt_ids"] + want["tokens"] and len(want["tokens"]) > 0


# ---- loss and gradients ----------------------------------------------------------------------------------------------


def test_loss_and_gradients_equal_segtrains(tmp_path):
    """The carried segment gets gradient, history does not (DESIGN.md §1): every parameter's gradient is segtrain's.
    transformers' loss function computes in float32 (``logits.float()``), hence float32 tolerances."""
    model = tiny(7, tie_word_embeddings=False)
    hf_model = load(export(tmp_path, model))
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    want = model(ids, labels=shifted)
    got = hf_model(ids, labels=labels).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    want.backward()
    got.backward()
    grads = dict(hf_model.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 1e-4, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- never silently inconsistent -------------------------------------------------------------------------------------


def test_loading_without_remote_code_asks_for_it(tmp_path):
    path = export(tmp_path, tiny(8))
    assert (path / hf.MODELING_FILE).read_bytes() == Path(hf_modeling.__file__).read_bytes()  # verbatim
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == hf_modeling.MODEL_TYPE and config["architectures"] == ["SegtrainLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_segtrain.SegtrainLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_segtrain.SegtrainLlamaForCausalLM"}  # fmt: skip
    for load_it in (transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load_it(path)
    with pytest.raises(ValueError, match="attn_implementation='sdpa': this model runs segment attention"):
        transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="sdpa")


def test_inputs_segment_attention_cannot_read_are_refused(tmp_path):
    hf_model = load(export(tmp_path, tiny(9)))
    ids = torch.randint(3, 97, (1, 12))
    with pytest.raises(ValueError, match="position_ids row 0: positions must count up by one"):
        hf_model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]))  # packed documents
    with pytest.raises(ValueError, match="attention_mask row 0: a row's tokens must be one run"):
        hf_model(ids, attention_mask=torch.tensor([[1] * 5 + [0] * 2 + [1] * 5]))
    with pytest.raises(ValueError, match="DynamicCache: this model keeps a SegmentCache"):
        hf_model(ids, **{remote(hf_model).CACHE_ARG: transformers.DynamicCache()})
    with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
        hf_model(ids, output_hidden_states=True)
    cache = getattr(hf_model(ids, use_cache=True), remote(hf_model).CACHE_ARG)
    with pytest.raises(ValueError, match="row 0: its tokens start at position 0, the cache holds positions up to 11"):
        hf_model(ids[:, :2], attention_mask=torch.ones(1, 2), **{remote(hf_model).CACHE_ARG: cache})  # a mask of 2 columns


# ---- round trip and lm-eval ------------------------------------------------------------------------------------------


def test_round_trip_gives_back_the_model_dir(tmp_path):
    from safetensors.torch import load_file

    model = tiny(10, num_kv_heads=4, history_policy=[["all", "none", "sink:1", "window:2"], "sink:3+window:2"])
    path = export(tmp_path, model)
    from_hf(path, tmp_path / "back", progress=False)
    src, back = load_file(tmp_path / "hf_src/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert sorted(src) == sorted(back) and all(torch.equal(src[k], back[k]) for k in src)
    config = load_config(tmp_path / "back")
    assert config.policy_table() == model.config.policy_table()  # written back as the explicit per-head table
    assert {**config.to_dict(), "history_policy": None} == {**model.config.to_dict(), "history_policy": None}


def test_lm_eval_hf_model_scores_what_segtrain_scores(tmp_path, tiny_tokenizer):
    """``--model hf --model_args pretrained=DIR,trust_remote_code=True`` against ``--model segtrain`` (segmented), on the
    local multiple-choice and rolling-perplexity tasks: the same log-likelihood for every request."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model imports accelerate (not in requirements.lock)")
    from lm_eval.tasks import TaskManager

    import segtrain.eval.harness  # noqa: F401  (registers --model segtrain)

    model = tiny(11, vocab_size=400, segment_size=4, max_position_embeddings=96)
    path = export(tmp_path, model, tokenizer=tiny_tokenizer.model_file)
    tasks = TaskManager(include_path="tests/data/lm_eval")
    segtrain_args = f"pretrained={tmp_path / 'hf_src'},tokenizer={tiny_tokenizer.model_file},dtype=float64"
    scores = {}
    for name, model_name, args in [
        ("hf", "hf", f"pretrained={path},trust_remote_code=True,dtype=float64,device=cpu,add_bos_token=False"),
        ("segtrain", "segtrain", f"{segtrain_args},mode=segmented"),
        ("full", "segtrain", f"{segtrain_args},mode=full"),
    ]:
        out = lm_eval.simple_evaluate(model=model_name, model_args=args, tasks=["segtrain_mc", "segtrain_ppl"],
                                      batch_size=2, task_manager=tasks, log_samples=True, limit=4)  # fmt: skip
        scores[name] = {t: [s["resps"] for s in samples] for t, samples in out["samples"].items()}
    assert scores["hf"].keys() == scores["segtrain"].keys() == {"segtrain_mc", "segtrain_ppl"}

    def loglikelihoods(responses):  # [[(logprob, is_greedy)]] per choice of a request, [[logprob]] for rolling ones
        return torch.tensor([[r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in rs] for rs in responses])

    for task in scores["segtrain"]:
        torch.testing.assert_close(loglikelihoods(scores["hf"][task]), loglikelihoods(scores["segtrain"][task]), **TOL)
    full, segmented = loglikelihoods(scores["full"]["segtrain_ppl"]), loglikelihoods(scores["segtrain"]["segtrain_ppl"])
    assert (full - segmented).abs().max() > 1e-2  # documents span several segments: full attention scores differently


# ---- on a GPU: the CUDA kernels' paths and the memory bound (run with `pytest -m gpu tests/test_hf_modeling.py`) ---


@pytest.mark.gpu
def test_gpu_export_equals_segtrain_and_its_engine(tmp_path):
    """float32 on CUDA (SDPA's CUDA kernels, generate's device paths): a left-padded batch's logits equal segtrain's
    forward, and greedy tokens equal segtrain's engine (Triton decode kernel)."""
    from segtrain.inference import SegmentedEngine

    policies = [["all", "none", "sink:4+window:64", "none"]] * 2
    model = tiny(13, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=4, head_dim=32, segment_size=256,
                 history_policy=policies, initializer_range=0.05, max_position_embeddings=4096).float()  # fmt: skip
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export(tmp_path, model), trust_remote_code=True)
    hf_model = hf_model.float().cuda().eval()
    model = model.cuda()
    rng = random.Random(1)
    rows = [[rng.randrange(3, 97) for _ in range(n)] for n in (1500, 900)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        logits = hf_model(ids.cuda(), attention_mask=mask.cuda()).logits
        for r, row in enumerate(rows):
            want = model(torch.tensor([row], device="cuda"))[0]
            torch.testing.assert_close(logits[r, ids.shape[1] - len(row) :], want, rtol=1e-4, atol=1e-4)
        out = hf_model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=40, do_sample=False,
                                eos_token_id=None, pad_token_id=0)  # fmt: skip
    want = SegmentedEngine(model).generate(rows, max_new_tokens=40).tokens
    assert out[:, ids.shape[1] :].tolist() == want


@pytest.mark.gpu
def test_gpu_bf16_prefill_holds_less_than_a_full_attention_cache(tmp_path):
    """bf16, 64K tokens, 25% of KV heads 'all': the prefill's peak beyond the weights stays under 60% of what the
    full-attention KV cache alone would take, and the SegmentCache holds what the policy reads."""
    T, S, layers, kv_heads, D = 65536, 2048, 8, 4, 64
    model = tiny(14, vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=layers, num_heads=8,
                 num_kv_heads=kv_heads, head_dim=D, segment_size=S, history_policy={"fraction": 0.25},
                 max_position_embeddings=T + 8, initializer_range=0.02)  # fmt: skip
    save_pretrained(model, model.config, tmp_path / "src")
    path = to_hf(tmp_path / "src", tmp_path / "hf", dtype="bfloat16", progress=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
    hf_model = hf_model.cuda().eval()
    ids = torch.randint(0, 1000, (1, T), device="cuda")
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = hf_model(ids, use_cache=True, logits_to_keep=1)
    beyond = torch.cuda.max_memory_allocated() - weights
    full_cache = layers * 2 * kv_heads * D * T * 2
    assert beyond < 0.6 * full_cache, (beyond / 2**20, full_cache / 2**20)
    cache = getattr(out, remote(hf_model).CACHE_ARG)
    held = layers * 2 * D * 2 * (T + (kv_heads - 1) * (T % S + S))  # one 'all' head; the others the last two segments
    # the last block's buffer also holds the segment before the kept one (dropped, freed by the next block): S keys
    dropped = layers * 2 * D * 2 * (kv_heads - 1) * max(S, remote(hf_model).PREFILL_CHUNK)
    assert held <= cache.memory_bytes() <= held + dropped and torch.isfinite(out.logits.float()).all()
