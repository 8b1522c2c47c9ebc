"""A path a user names: a missing one "does not exist" and a broken JSON file is named, the same way in every command
(before a later step misreads the cause: "no tokenizer files here", or the JSON parser's bare message)."""

import json
import re

import pytest
import torch

from segtrain.checkpoint import save_pretrained
from segtrain.cli import main
from segtrain.config import ModelConfig
from segtrain.errors import UserError
from segtrain.models.llama import LlamaForCausalLM
from segtrain.userfiles import existing_path, read_json


def test_existing_path_names_the_flag_and_the_kind(tmp_path):
    (tmp_path / "f").write_text("x")
    assert existing_path(tmp_path, "--model", kind="dir") == tmp_path
    with pytest.raises(UserError, match=r"^--model: .*/nope does not exist$"):
        existing_path(tmp_path / "nope", "--model", kind="dir")
    with pytest.raises(UserError, match=r"^--model: .*/f is not a directory$"):
        existing_path(tmp_path / "f", "--model", kind="dir")
    with pytest.raises(UserError, match=r"^--tokenizer: .* is not a file$"):
        existing_path(tmp_path, "--tokenizer", kind="file")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": 1,', r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 9\)"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (b"\xff\xfe{}", r"is not valid JSON \(not UTF-8 text\)"),
    ],
)
def test_read_json_names_the_file(tmp_path, text, message):
    file = tmp_path / "config.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=f"^{re.escape(str(file))} {message}$"):
        read_json(file)
    file.write_text('{"a": [1]}')
    assert read_json(file) == {"a": [1]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         segment_size=8, attention_backend="math")  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m"
    save_pretrained(LlamaForCausalLM(config), config, path)
    return path


COMMANDS = {
    "generate": lambda model, tmp: ["generate", "--model", model, "--prompt-ids", "1,2"],
    "eval": lambda model, tmp: ["eval", "--model", model, "--no-progress"],
    "convert --to hf": lambda model, tmp: ["convert", "--to", "hf", model, f"{tmp}/hf", "--no-progress"],
    "convert --from hf": lambda model, tmp: ["convert", "--from", "hf", model, f"{tmp}/m2", "--no-progress"],
    "calibrate": lambda model, tmp: ["calibrate", "--model", model, "--out", f"{tmp}/cal", "--no-progress"],
}


def _one_error_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_model_dir_does_not_exist_in_every_command(tmp_path, capsys, command):
    missing = tmp_path / "nonexistent"
    err = _one_error_line(capsys, COMMANDS[command](str(missing), tmp_path))
    assert err.endswith(f"{missing} does not exist"), err
    assert not any(p.name != "nonexistent" for p in tmp_path.iterdir())  # nothing written


def test_generate_with_a_text_prompt_says_the_model_dir_does_not_exist(tmp_path, capsys):
    err = _one_error_line(capsys, ["generate", "--model", str(tmp_path / "nonexistent"), "--prompt", "hello"])
    assert err == f"segtrain generate: error: --model: {tmp_path / 'nonexistent'} does not exist"  # was: no tokenizer files


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("hf", [False, True], ids=["segtrain-dir", "hf-dir"])
def test_a_corrupted_config_json_is_named_in_every_command(tmp_path, capsys, model_dir, command, hf):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in model_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    text = json.dumps({"model_type": "llama"} if hf else json.loads((model_dir / "config.json").read_text()))
    (broken / "config.json").write_text(text[: len(text) // 2])  # cut off mid-write
    err = _one_error_line(capsys, COMMANDS[command](str(broken), tmp_path))
    assert f"{broken / 'config.json'} is not valid JSON (" in err, err
