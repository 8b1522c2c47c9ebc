"""Hugging Face conversion both ways: bit-exact round trips (portable dirs and DeepSpeed ZeRO checkpoints), the
same logits as transformers' Llama, sharded output, policies kept through HF, field-named errors, tokenizer files,
and HF directories loaded directly by ``load_pretrained`` / ``segtrain generate``."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import MIXED, make_model, spread_norms
from tiny_models import tiny_config as shared_tiny_config

from segtrain.checkpoint import hf, load_config, load_pretrained, load_state_dict_into, save_pretrained
from segtrain.checkpoint.hf import ConversionError
from segtrain.config import ConfigError, ModelConfig
from segtrain.convert import from_hf, to_hf
from segtrain.models.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


tiny_config = functools.partial(
    shared_tiny_config, vocab_size=97, hidden_size=32, intermediate_size=48, num_heads=4, segment_size=8,
    attention_backend="math", initializer_range=0.2
)  # fmt: skip


def tiny_model(seed: int = 0, dtype=torch.float32, **fields) -> LlamaForCausalLM:
    return spread_norms(make_model(tiny_config(**fields), seed, dtype))


def weights(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


# ---- segtrain -> HF -> segtrain ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, fields",
    [
        (torch.float32, dict(tie_word_embeddings=True, rope_theta=5e5, rope_scaling=LLAMA3_ROPE)),
        (
            torch.float32,
            dict(num_kv_heads=4, tie_word_embeddings=False, history_policy=[["all", "none", "sink:1", "window:2"], "none"]),
        ),
        (torch.bfloat16, dict(num_kv_heads=1, history_policy=[["all"], ["sink:1"]])),
    ],
)
def test_portable_round_trip_is_bit_exact(tmp_path, dtype, fields):
    model = tiny_model(1, dtype, **fields)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    from_hf(tmp_path / "hf", tmp_path / "back", progress=False)
    assert_same_weights(read_weights(tmp_path / "back"), weights(model))
    back = load_config(tmp_path / "back")
    assert back.policy_table() == model.config.policy_table()
    assert {k: v for k, v in back.to_dict().items() if k != "history_policy"} == {
        k: v for k, v in model.config.to_dict().items() if k != "history_policy"
    }
    hf_config = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf_config["architectures"] == ["SegtrainLlamaForCausalLM"] and hf_config["model_type"] == "segtrain_llama"
    assert (tmp_path / "hf" / hf.MODELING_FILE).is_file()  # the segment-attention export (tests/test_hf_modeling.py)
    assert hf_config["torch_dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert hf_config["segtrain"]["history_policy"] == model.config.policy_table().to_spec()
    assert json.loads((tmp_path / "hf/generation_config.json").read_text())["eos_token_id"] == 2


def test_dtype_option_casts_every_tensor(tmp_path):
    model = tiny_model(2)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", dtype="bfloat16", progress=False)
    from_hf(tmp_path / "hf", tmp_path / "back", progress=False)  # auto: stays bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in weights(model).items()}
    assert_same_weights(read_weights(tmp_path / "back"), expected)
    from_hf(tmp_path / "hf", tmp_path / "back32", dtype="float32", progress=False)
    assert_same_weights(read_weights(tmp_path / "back32"), {k: v.float() for k, v in expected.items()})


# ---- the same logits as transformers -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(tie_word_embeddings=True, rope_theta=5e5, rope_scaling=LLAMA3_ROPE, num_kv_heads=2),  # llama3 RoPE, GQA, tied
        dict(tie_word_embeddings=False, num_kv_heads=4, rope_theta=10000.0),  # Llama 2 style
        dict(
            tie_word_embeddings=True, num_kv_heads=1, rope_scaling=LLAMA3_ROPE, segment_size=5
        ),  # S < T: 'all' is full attention
    ],
)
def test_transformers_gives_the_same_logits(tmp_path, fields):
    model = tiny_model(3, **{"segment_size": 64, **fields, "history_policy": "all"})
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", plain_llama=True, progress=False)
    hf_config = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf_config["model_type"] == "llama" and "auto_map" not in hf_config
    assert not (tmp_path / "hf" / hf.MODELING_FILE).exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(ref) is transformers.LlamaForCausalLM  # no remote code: a plain Llama
    assert ref.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(ids), ref(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=2e-5)
    assert expected.std() > 0.1  # random weights give logits far from zero: the comparison means something


def test_sharded_output_loads_in_transformers_and_back(tmp_path):
    model = tiny_model(4, tie_word_embeddings=False, history_policy="all", segment_size=64)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", max_shard_size="20KB", plain_llama=True, progress=False)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert sorted(index["weight_map"]) == sorted(weights(model))
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in weights(model).values())
    sizes = [(tmp_path / "hf" / s).stat().st_size for s in shards]
    assert max(sizes) < 20_000 + 4_000  # data under the limit; header on top
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-5, atol=2e-5)
    from_hf(tmp_path / "hf", tmp_path / "back", progress=False)
    assert_same_weights(read_weights(tmp_path / "back"), weights(model))


def test_shard_planning_and_sizes():
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 * 2**30 and hf.parse_size("100") == 100
    assert hf.parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="max-shard-size"):
        hf.parse_size("five")
    assert hf.plan_shards({"a": 4, "b": 4, "c": 10, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


def test_plain_llama_is_a_flag_that_says_it_changes_the_model(tmp_path, capsys):
    from segtrain.cli import main

    model = tiny_model(16)
    save_pretrained(model, model.config, tmp_path / "src")
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "full attention, which changes the model's behaviour" in " ".join(capsys.readouterr().out.lower().split())
    assert main(["convert", "--to", "hf", str(tmp_path / "src"), str(tmp_path / "hf"), "--plain-llama", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--plain-llama: transformers will run full attention" in err and "sink:2+window:3" in err
    assert json.loads((tmp_path / "hf/config.json").read_text())["model_type"] == "llama"


# ---- policies through HF, HF models without a segtrain key -----------------------------------------


def test_hf_directory_keeps_and_overrides_the_policy(tmp_path):
    model = tiny_model(5)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    direct = load_pretrained(tmp_path / "hf")  # generate --model HF_DIR
    assert direct.config.policy_table() == model.config.policy_table() and direct.config.segment_size == 8
    ids = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(direct(ids), model(ids))
    other = load_pretrained(tmp_path / "hf", segment_size=4, history_policy="sink:1")
    assert other.config.segment_size == 4 and {str(p) for row in other.config.policy_table().layers for p in row} == {"sink:1"}
    from_hf(tmp_path / "hf", tmp_path / "flags", segment_size=16, policy={"first_k": 1}, progress=False)
    cfg = load_config(tmp_path / "flags")
    assert cfg.segment_size == 16 and cfg.policy_table().to_spec() == [["all", "none"], ["all", "none"]]


def hf_native(tmp_path: Path, **overrides) -> Path:
    """A directory written by transformers itself (no segtrain key)."""
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE}, **overrides,
    )  # fmt: skip
    torch.manual_seed(6)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path / "native"
    model.save_pretrained(out)
    return out


def test_a_transformers_model_converts_and_runs_as_full_attention(tmp_path):
    src = hf_native(tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    from_hf(src, tmp_path / "seg", progress=False)
    cfg = load_config(tmp_path / "seg")
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert {str(p) for row in cfg.policy_table().layers for p in row} == {"all"}
    model = load_pretrained(tmp_path / "seg")
    ids = torch.randint(0, 61, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-5, atol=2e-5)
    # init-from reads the HF directory directly too
    fresh = LlamaForCausalLM(cfg)
    load_state_dict_into(fresh, src)
    assert_same_weights(fresh.state_dict(), model.state_dict())


def test_pytorch_model_bin_and_model_yaml(tmp_path):
    src = hf_native(tmp_path)
    state = transformers.LlamaForCausalLM.from_pretrained(src).state_dict()
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    flavor = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    arch = load_config(tmp_path / "native" / "config.json").to_dict()
    yaml_config = {**arch, "segment_size": 16, "history_policy": {"first_k": 1}, "attention_backend": flavor["attention_backend"]}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(yaml_config))
    from_hf(src, tmp_path / "seg", model_config=tmp_path / "model.yaml", progress=False)
    cfg = load_config(tmp_path / "seg")
    assert cfg.segment_size == 16 and cfg.policy_table().to_spec()[0] == ["all", "none"]
    assert_same_weights(read_weights(tmp_path / "seg"), {k: v for k, v in state.items()})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**yaml_config, "num_kv_heads": 6}))
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        from_hf(src, tmp_path / "bad", model_config=tmp_path / "bad.yaml", progress=False)


# ---- errors name what is wrong -------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="mistral"), r"model_type: 'mistral' is not supported"),
        (dict(architectures=["MistralForCausalLM"]), r"architectures: .*MistralForCausalLM"),
        (dict(attention_bias=True), r"attention_bias: true is not supported"),
        (dict(mlp_bias=True), r"mlp_bias: true"),
        (dict(hidden_act="gelu"), r"hidden_act: 'gelu'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling.rope_type: 'yarn'"),
        (
            dict(num_key_value_heads=4, segtrain=None),
            r"'model.layers.0.self_attn.k_proj.weight' has shape \[16, 32\], the config implies \[32, 32\]",
        ),
        (dict(segtrain={"segment_size": 8, "history_policy": [["all"]]}), r"history_policy"),
    ],
)
def test_unsupported_or_inconsistent_hf_configs_are_named(tmp_path, changes, match):
    model = tiny_model(7)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises((ConfigError, ConversionError), match=match):
        from_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not list(tmp_path.glob(".out.tmp*"))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(8)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    file = tmp_path / "hf/model.safetensors"
    state = load_file(file)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, file, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        from_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight' is missing"):
        load_pretrained(tmp_path / "hf")
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}, file, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        from_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    (tmp_path / "hf/model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        from_hf(tmp_path / "hf", tmp_path / "out", progress=False)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model = tiny_model(9)
    save_pretrained(model, model.config, tmp_path / "src")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    assert (tmp_path / "hf/keep.txt").is_file()
    to_hf(tmp_path / "src", tmp_path / "hf", overwrite=True, progress=False)
    assert not (tmp_path / "hf/keep.txt").exists() and (tmp_path / "hf/model.safetensors").is_file()


# ---- tokenizer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    """conftest's tiny tokenizer (400 pieces, 100 KB of the corpus)."""
    return tiny_tokenizer


def test_tokenizer_files_load_in_transformers_and_generate_reads_the_hf_dir(tmp_path, tokenizer, capsys):
    from segtrain.inference import cli as generate_cli

    model = tiny_model(10, vocab_size=400, history_policy=MIXED)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", tokenizer=tokenizer.model_file, progress=False)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    texts = ["def f(x):\n    return x + 1\n", "Straße, 日本語 🙂", "  two  spaces"]
    for cls in (transformers.AutoTokenizer, transformers.LlamaTokenizer):
        tok = cls.from_pretrained(tmp_path / "hf", trust_remote_code=True)  # AutoTokenizer reads the (remote-code) config
        for text in texts:
            assert tok.encode(text) == tokenizer.encode(text, bos=True)
    # generate: the HF dir gives model, policy and tokenizer; the same tokens as the portable source
    results = {}
    for name in ("src", "hf"):
        parser = __import__("argparse").ArgumentParser()
        generate_cli.add_arguments(parser)
        extra = ["--tokenizer", tokenizer.model_file] if name == "src" else []
        args = parser.parse_args(
            ["--model", str(tmp_path / name), "--prompt", texts[0], "--max-new-tokens", "6", "--json", *extra]
        )
        assert generate_cli.run(args) == 0
        results[name] = json.loads(capsys.readouterr().out.splitlines()[0])
    assert results["src"]["tokens"] == results["hf"]["tokens"] and len(results["hf"]["tokens"]) > 0
    assert results["hf"]["prompt_ids"] == tokenizer.encode(texts[0])


def test_generate_uses_a_foreign_hf_tokenizer(tmp_path, capsys):
    """An HF dir whose tokenizer is not segtrain's (here a word-level one) generates through transformers' tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from segtrain.inference import cli as generate_cli

    src = hf_native(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(["the", "cat", "sat", "on", "a", "mat"])}}
    raw = RawTokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(src)
    parser = __import__("argparse").ArgumentParser()
    generate_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(src), "--prompt", "the cat sat", "--max-new-tokens", "3", "--json", "--stop-ids", "60"]
    )
    assert generate_cli.run(args) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["prompt_ids"] == [3, 4, 5] and len(out["tokens"]) == 3


# ---- DeepSpeed training checkpoints --------------------------------------------------------------


def train_run(tmp_path: Path, corpus: str, zero_stage: int) -> Path:
    """Three steps of the tiny config (checkpoints at 2 and 3, final weights exported).

    ZeRO-3 runs with activation checkpointing: its wrapper's name prefix must not reach the HF names.
    """
    run = tmp_path / f"zero{zero_stage}"
    cfg = {
        "model": {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "attention_backend": "math"},
        "data": {"prefixes": [corpus], "seq_length": 64},
        "steps": 3,
        "micro_batch_size": 2,
        "log_every": 1,
        "save_every": 2,
        "keep_last": 2,
        "out_dir": os.fspath(run),
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "weight_decay": 0.0},
        "parallel": {"zero_stage": zero_stage, "precision": "fp32"},
        "portable": {"activation": {"checkpointing": zero_stage == 3}},
    }
    (tmp_path / f"zero{zero_stage}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "segtrain.cli",
        "train",
        "--config",
        os.fspath(tmp_path / f"zero{zero_stage}.yaml"),
        "--no-progress",
    ]
    subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True, timeout=300)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_deepspeed_checkpoint_round_trip_is_bit_exact(tmp_path, corpus, zero_stage):
    run = train_run(tmp_path, corpus, zero_stage)
    # what the run exported at its last step (the ZeRO-3 export keeps the checkpoint wrapper's prefix: not ours to fix)
    final = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in read_weights(run / "final").items()}
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000003"
    zero_shards = list((run / "checkpoints/step_00000003").glob("*zero_pp_rank_0_*optim_states.pt"))
    assert len(zero_shards) == (zero_stage > 0)  # stages 1-3 go through DeepSpeed's zero_to_fp32 merge
    # the checkpoints dir (its 'latest'), through the CLI
    cmd = [
        sys.executable,
        "-m",
        "segtrain.cli",
        "convert",
        "--to",
        "hf",
        os.fspath(run / "checkpoints"),
        os.fspath(tmp_path / "hf"),
    ]
    subprocess.run([*cmd, "--no-progress"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True, timeout=300)
    from_hf(tmp_path / "hf", tmp_path / "back", progress=False)
    assert_same_weights(read_weights(tmp_path / "back"), final)
    assert load_config(tmp_path / "back").policy_table().to_spec() == [["all", "none"], ["all", "none"]]
    # an earlier step by --tag, and a step dir named directly: the same weights, different from the final ones
    to_hf(run / "checkpoints", tmp_path / "hf2", tag="step_00000002", progress=False)
    to_hf(run / "checkpoints/step_00000002", tmp_path / "hf2b", progress=False)
    from safetensors.torch import load_file

    step2 = load_file(tmp_path / "hf2/model.safetensors")
    assert_same_weights(step2, load_file(tmp_path / "hf2b/model.safetensors"))
    assert not torch.equal(step2["model.norm.weight"], final["model.norm.weight"])
    # the portable export converts to the same HF weights as the checkpoint
    to_hf(run / "final", tmp_path / "hf3", progress=False)
    assert_same_weights(load_file(tmp_path / "hf3/model.safetensors"), load_file(tmp_path / "hf/model.safetensors"))


@pytest.mark.slow
def test_tools_scripts_and_cli_errors(tmp_path):
    model = tiny_model(11)
    save_pretrained(model, model.config, tmp_path / "src")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run("tools/convert_to_hf.py", tmp_path / "src", tmp_path / "hf", "--dtype", "bfloat16", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run(
        "tools/convert_from_hf.py", tmp_path / "hf", tmp_path / "back", "--policy", "sink:4+window:16", "--segment-size", "32"
    )
    assert r.returncode == 0, r.stderr
    cfg = load_config(tmp_path / "back")
    assert cfg.segment_size == 32 and str(cfg.policy_table()[0][0]) == "sink:4+window:16"
    r = run("-m", "segtrain.cli", "convert", "--from", "hf", tmp_path / "hf", tmp_path / "x", "--policy", "bogus")
    assert r.returncode == 2 and "history_policy" in r.stderr and "bogus" in r.stderr
    r = run("-m", "segtrain.cli", "convert", "--from", "hf", tmp_path / "hf", tmp_path / "x", "--tp", "2")
    assert r.returncode == 2 and "model.vocab_size: 97 is not a multiple of parallel.tp=2" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run("-m", "segtrain.cli", "convert", "--to", "hf", tmp_path / "nothing", tmp_path / "x")
    assert r.returncode == 2 and "nothing" in r.stderr


# ---- megatron shards (TP x PP) -------------------------------------------------------------------


def megatron_step_dir(path: Path, state: dict, config: ModelConfig, tp: int, pp: int) -> Path:
    """A training checkpoint's tag dir as a megatron model writes it: one mp_rank_XX file per (TP, PP) rank."""
    from segtrain.models.megatron_adapter import hf_to_megatron
    from segtrain.parallel.groups import model_parallel_rank

    path.mkdir(parents=True)
    for (r, p), shard in hf_to_megatron(state, config, tp, pp).items():
        torch.save({"module": shard, "buffer_names": []}, path / f"mp_rank_{model_parallel_rank(r, p, tp):02d}_model_states.pt")
    trainer_state = {"step": 5, "config": {"model": config.to_dict(), "parallel": {"tp": tp, "pp": pp, "zero_stage": 1}}}
    (path / "trainer_state.json").write_text(json.dumps(trainer_state))
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_megatron_tp2_pp2_shards_convert_like_tp1(tmp_path, tie):
    from safetensors.torch import load_file

    model = tiny_model(12, vocab_size=96, num_layers=4, tie_word_embeddings=tie, history_policy="sink:2")
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf1", progress=False)  # the TP=1 conversion
    run = tmp_path / "run/checkpoints"
    megatron_step_dir(run / "step_00000005", weights(model), model.config, tp=2, pp=2)
    (run / "latest").write_text("step_00000005\n")
    to_hf(run, tmp_path / "hf22", progress=False)
    assert_same_weights(load_file(tmp_path / "hf22/model.safetensors"), load_file(tmp_path / "hf1/model.safetensors"))
    assert json.loads((tmp_path / "hf22/config.json").read_text()) == json.loads((tmp_path / "hf1/config.json").read_text())


def test_from_hf_writes_megatron_shards_that_convert_back(tmp_path):
    from segtrain.checkpoint.run import load_megatron_shards

    model = tiny_model(13, vocab_size=96, num_layers=4, tie_word_embeddings=False, history_policy="window:3")
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    from_hf(tmp_path / "hf", tmp_path / "seg", tp=2, pp=2, progress=False)
    assert_same_weights(read_weights(tmp_path / "seg"), weights(model))  # the portable dir as always
    shards, tp, pp = load_megatron_shards(tmp_path / "seg/megatron_tp2_pp2")
    assert (tp, pp) == (2, 2) and len(shards) == 4
    qkv = shards[(1, 0)]["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert tuple(qkv.shape) == ((4 // 2 + 2) * 8, 32)  # one query group per TP rank: 2 query + k + v heads of dim 8
    to_hf(tmp_path / "seg/megatron_tp2_pp2", tmp_path / "back", progress=False)
    assert_same_weights(read_weights(tmp_path / "back"), weights(model))


def test_generate_flags_override_the_hf_dirs_execution(tmp_path, capsys):
    from segtrain.inference import cli as generate_cli

    model = tiny_model(14)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    parser = __import__("argparse").ArgumentParser()
    generate_cli.add_arguments(parser)
    tokens = {}
    for name in ("src", "hf"):
        for flags in ([], ["--segment-size", "4", "--policy", "{first_k: 1, policy: 'sink:1', rest: none}"]):
            args = parser.parse_args(["--model", str(tmp_path / name), "--prompt-ids", "5,9,3,7,1,2,8,6,4,11", "--json", *flags])
            assert args.max_new_tokens == 64 and generate_cli.run(args) == 0
            tokens[name, bool(flags)] = json.loads(capsys.readouterr().out.splitlines()[0])["tokens"]
    assert tokens["src", False] == tokens["hf", False] and tokens["src", True] == tokens["hf", True]
    assert tokens["hf", False] != tokens["hf", True]  # the override changed what the model sees


@pytest.mark.slow
def test_from_hf_output_initialises_training(tmp_path, corpus):
    """``segtrain train --init-from`` starts from the converted weights (a tiny lr barely moves them)."""
    from segtrain.config import load_model_config

    config = load_model_config("tiny", {"attention_backend": "math"})
    torch.manual_seed(15)
    model = LlamaForCausalLM(config)
    save_pretrained(model, config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    from_hf(tmp_path / "hf", tmp_path / "init", progress=False)
    cfg = {
        "model": {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "attention_backend": "math"},
        "data": {"prefixes": [corpus], "seq_length": 64},
        "steps": 1,
        "micro_batch_size": 1,
        "save_every": 1,
        "out_dir": os.fspath(tmp_path / "run"),
        "optim": {"lr": 1e-7, "min_lr": 1e-8, "warmup_steps": 1, "weight_decay": 0.0},
        "parallel": {"zero_stage": 0, "precision": "fp32"},
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(tmp_path / "t.yaml"), "--no-progress"]
    subprocess.run(
        [*cmd, "--init-from", os.fspath(tmp_path / "init")], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True
    )
    trained, start = read_weights(tmp_path / "run/final"), weights(model)
    assert sorted(trained) == sorted(start)
    for name, value in start.items():
        assert (trained[name] - value).abs().max() < 1e-5, name  # a random init would differ by ~0.02
