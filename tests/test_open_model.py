"""``open_model``: every model source a command takes opens to the same config, weights and tokenizer; a wrong source
is one line naming the path and what was expected; ``generate`` takes a training run directory like ``eval`` does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import FakeEngine

from segtrain.checkpoint import run as checkpoint
from segtrain.checkpoint import save_pretrained
from segtrain.checkpoint.open import DTYPES, SOURCES, open_model, torch_dtype
from segtrain.cli import main
from segtrain.config import load_model_config
from segtrain.convert import from_hf, to_hf
from segtrain.data.tokenizer import TOKENIZER_FILES, holds_tokenizer
from segtrain.errors import UserError
from segtrain.models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TINY = load_model_config("tiny", {"vocab_size": 400})  # the tiny tokenizer's: generated ids decode


def _run(tmp_path: Path, tokenizer: str) -> tuple[Path, dict[int, dict]]:
    """A training run ``OUT`` whose checkpoints hold different random weights at steps 2 and 4 (ZeRO 0 layout),
    ``OUT/final`` (step 4's weights, no tokenizer of its own: the run names it)."""
    config = TINY
    out, states = tmp_path / "run", {}

    class Engine(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest=False):
            (Path(save_dir) / tag).mkdir(parents=True)
            step = checkpoint.step_of(tag.removesuffix(".partial"))
            torch.save({"module": states[step]}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    for step in (2, 4):
        torch.manual_seed(step)
        states[step] = LlamaForCausalLM(config).state_dict()
        trainer = {"step": step, "config": {"model": config.to_dict(), "parallel": {}, "data": {"tokenizer": tokenizer}}}
        checkpoint.save(Engine(), out / "checkpoints", step, trainer)
    save_pretrained(None, config, out / "final", state_dict=states[4])
    return out, states


def _same_weights(source, state: dict) -> None:
    assert sorted(source.names) == sorted(k for k in state if k != "lm_head.weight" or not source.config.tie_word_embeddings)
    for name in source.names:
        assert torch.equal(source.weights[name], state[name]), name


def test_every_source_opens_to_the_same_model_and_tokenizer(tmp_path, tiny_tokenizer):
    out, states = _run(tmp_path, tiny_tokenizer.model_file)
    tok = Path(tiny_tokenizer.model_file)
    for path, tag, step, kind in [
        (out, None, 4, "checkpoint"),  # a training run dir: its latest checkpoint
        (out, "step_00000002", 2, "checkpoint"),  # ... or the step asked for
        (out / "checkpoints", None, 4, "checkpoint"),
        (out / "checkpoints/step_00000002", None, 2, "checkpoint"),
        (out / "final", None, 4, "portable"),  # OUT/final: the tokenizer its run names
    ]:
        source = open_model(path, tag=tag)
        assert source.kind == kind and source.config == TINY and source.tokenizer == tok, path
        _same_weights(source, states[step])
    hf = to_hf(out / "final", tmp_path / "hf", progress=False)
    source = open_model(hf)  # an HF dir carries its tokenizer files
    assert source.kind == "hf" and source.tokenizer == hf and holds_tokenizer(hf)
    _same_weights(source, states[4])
    model = source.build(device="cpu", dtype=torch.float64)
    assert model.lm_head.weight.dtype == torch.float64 and not model.training
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, states[4]["model.layers.1.mlp.up_proj.weight"].double())
    overridden = open_model(out, segment_size=8, history_policy="none")  # execution overrides, for every kind
    assert overridden.config.segment_size == 8 and {str(p) for row in overridden.config.policy_table().layers for p in row} == {
        "none"
    }


def test_a_wrong_source_is_one_line_naming_the_path_and_what_was_expected(tmp_path, tiny_tokenizer):
    out, _ = _run(tmp_path, tiny_tokenizer.model_file)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights/config.json").write_text((out / "final/config.json").read_text())
    for path, tag, message in [
        (tmp_path / "nope", None, f"{tmp_path / 'nope'}: does not exist (expected {SOURCES})"),
        (tmp_path / "file", None, f"{tmp_path / 'file'}: not a directory (expected {SOURCES})"),
        (tmp_path / "empty", None, f"{tmp_path / 'empty'}: not a model (expected {SOURCES})"),
        (tmp_path / "noweights", None, f"no model.safetensors in {tmp_path / 'noweights'}"),
        (out / "final", "step_00000002", f"--tag: {out / 'final'} is a portable model dir, not a training run"),
        (out, "step_00000009", "checkpoint step_00000009: "),
    ]:
        with pytest.raises(UserError) as e:
            open_model(path, tag=tag)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), (path, str(e.value))
    with pytest.raises(UserError, match=f"{out / 'final'}: a segtrain model dir, not a Hugging Face Llama dir"):
        from_hf(out / "final", tmp_path / "x", progress=False)  # --from hf opens only what it converts


def test_dtypes_and_the_tokenizer_files_are_one_list_each():
    assert [torch_dtype(n) for n in DTYPES] == [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    assert torch_dtype("auto") is None
    with pytest.raises(UserError, match="--dtype: expected auto or one of float32, bfloat16, float16, float64, got 'fp8'"):
        torch_dtype("fp8")
    assert TOKENIZER_FILES[0] == "tokenizer.model" and "tokenizer.json" in TOKENIZER_FILES
    owners = {r"(^|[^_])DTYPES *=": "segtrain/checkpoint/open.py", '"tokenizer.json"': "segtrain/data/tokenizer.py"}
    for pattern, owner in owners.items():
        found = subprocess.run(["grep", "-rlE", pattern, "segtrain"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        assert found == [owner], (pattern, found)


def test_generate_takes_a_training_run_dir_and_its_tokenizer(tmp_path, tiny_tokenizer, capsys):
    out, _ = _run(tmp_path, tiny_tokenizer.model_file)
    rows = {}
    for model in (out, out / "final"):  # the run's latest checkpoint and OUT/final hold the same weights
        args = ["generate", "--model", str(model), "--prompt", "The pass key is", "--max-new-tokens", "3", "--json"]
        assert main(args) == 0
        rows[model] = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rows[out] == rows[out / "final"] and rows[out]["prompt_ids"] == tiny_tokenizer.encode("The pass key is")
    assert main(["generate", "--model", str(out), "--tag", "step_00000002", "--prompt-ids", "1,5", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run/checkpoints/step_00000002"), "--prompt-ids", "1,5"]) == 0


def test_help_still_does_not_import_torch():
    code = "import sys, segtrain.checkpoint.open, segtrain.inference.cli, segtrain.eval.cli, segtrain.convert\n"
    code += "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('segtrain'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
