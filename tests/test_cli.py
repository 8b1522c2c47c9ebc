"""The ``segtrain`` command as a new user meets it: --version, fast --help, and one line (exit 2) for every
mistake a user can make: the flag, field or file is named; a traceback only with --debug."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import ENV, ROOT, FakeEngine, write_config

from segtrain.checkpoint import run as checkpoint
from segtrain.checkpoint import save_pretrained
from segtrain.cli import main
from segtrain.config import load_model_config
from segtrain.errors import UserError
from segtrain.train.config import load_train_config

COMMANDS = ["train", "generate", "convert", "eval", "calibrate", "preprocess", "demo"]


def fails(capsys, *argv: str) -> str:
    """Run ``segtrain argv`` in this process: exit status 2 and exactly one line on stderr, which is returned."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"segtrain {argv[0]}: error: "), err
    return err[0]


def test_version_and_help_do_not_wait_for_torch():
    code = (
        "import sys\nfrom segtrain.cli import main\n"
        f"for argv in [['--help'], ['--version'], *[[c, '--help'] for c in {COMMANDS!r}]]:\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "    assert 'torch' not in sys.modules, argv\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "segtrain 0.1.0" in result.stdout and "preprocess" in result.stdout


def test_yaml_numbers_and_model_overrides(tmp_path, corpus):
    config = write_config(tmp_path, corpus)
    config.write_text(config.read_text().replace("lr: 0.003", "lr: 3e-3").replace("min_lr: 0.0003", "min_lr: 3e-4"))
    assert "lr: 3e-3" in config.read_text()
    cfg = load_train_config(config, {"model.segment_size": 64, "optim.weight_decay": 1e-2})
    assert cfg.optim.lr == 0.003 and cfg.optim.min_lr == 0.0003 and cfg.optim.weight_decay == 0.01
    assert cfg.model.segment_size == 64 and cfg.model.hidden_size == load_model_config("tiny").hidden_size
    assert main(["train", "--config", str(config), "--set", "model.segment_size=64", "--set", "optim.lr=1e-3", "--check"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "steps"], "--set: expected KEY=VALUE (e.g. --set steps=100), got 'steps'"),
        (["--set", "optim.lr=[1"], "--set optim.lr: not valid YAML"),
        (["--set", "steps.x=1"], "steps: is 6, so --set steps.x has nothing to set"),
        (["--set", "stpes=3"], "stpes: unknown key"),
        (["--resume", "atuo"], "--resume: 'atuo' is not 'auto', 'none', a step number or a checkpoint folder"),
        (["--resume", "step_00000020"], "checkpoint step_00000020: "),
        (["--resume", "20"], "checkpoint step_00000020: "),
        (["--stop-at", "0"], "--stop-at: must be a positive step number"),
    ],
)
def test_train_flag_mistakes_are_one_line(tmp_path, corpus, capsys, extra, message):
    assert message in fails(capsys, "train", "--config", str(write_config(tmp_path, corpus)), *extra, "--check")


def test_config_file_mistakes_are_one_line(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    config.write_text(config.read_text() + "steps: [1\n")
    assert f"{config}: not valid YAML" in fails(capsys, "train", "--config", str(config), "--check")
    assert "config file not found: nope.yaml" in fails(capsys, "train", "--config", "nope.yaml")


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_truncated_dataset_is_named_before_training(tmp_path, corpus, capsys, suffix):
    prefix = tmp_path / "copy"
    for s in (".bin", ".idx"):
        data = Path(corpus + s).read_bytes()
        (prefix.parent / (prefix.name + s)).write_bytes(data[: len(data) - 100] if s == suffix else data)
    line = fails(capsys, "train", "--config", str(write_config(tmp_path, str(prefix))), "--check")
    assert f"data.prefixes[0]: {prefix}{suffix}: truncated" in line


def test_a_folder_holding_another_run_is_refused_before_training(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    checkpoint.save(FakeEngine(), tmp_path / "run/checkpoints", 5, {"step": 5, "config": {}})
    line = fails(capsys, "train", "--config", str(config), "--check")
    assert f"{tmp_path / 'run'} holds another run (checkpoints up to step_00000005" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert main(["train", "--config", str(config), "--check", "--overwrite"]) == 0
    assert (tmp_path / "run/checkpoints/step_00000005").is_dir()  # --check deletes nothing


def test_init_from_is_checked_before_training(tmp_path, corpus, capsys):
    from segtrain.models.llama import LlamaForCausalLM

    config = str(write_config(tmp_path, corpus))
    line = fails(capsys, "train", "--config", config, "--init-from", str(tmp_path / "nope"), "--check")
    assert f"--init-from: {tmp_path / 'nope'} is not a model directory" in line
    other = load_model_config("tiny", {"vocab_size": 512})
    save_pretrained(LlamaForCausalLM(other), other, tmp_path / "other")
    line = fails(capsys, "train", "--config", config, "--init-from", str(tmp_path / "other"), "--check")
    assert f"--init-from: {tmp_path / 'other'} has model.vocab_size=512, the config says 1024" in line


def tiny_checkpoints(tmp_path: Path) -> Path:
    """A run's checkpoints dir (ZeRO 0 layout) holding the tiny model at steps 2 and 4."""
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny")
    ckpts = tmp_path / "checkpoints"

    class Engine(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest=False):
            (Path(save_dir) / tag).mkdir(parents=True)
            torch.save({"module": LlamaForCausalLM(config).state_dict()}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    for step in (2, 4):
        checkpoint.save(Engine(), ckpts, step, {"step": step, "config": {"model": config.to_dict(), "parallel": {}}})
    return ckpts


def test_convert_names_a_damaged_checkpoint_and_a_missing_tag(tmp_path, capsys):
    ckpts = tiny_checkpoints(tmp_path)
    line = fails(capsys, "convert", "--to", "hf", str(ckpts), str(tmp_path / "hf"), "--tag", "step_00000009", "--no-progress")
    assert "checkpoint step_00000009: " in line and "does not exist (checkpoints here: step_00000002, step_00000004)" in line
    assert "latest" not in line
    weights = ckpts / "step_00000004/mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = fails(capsys, "convert", "--to", "hf", str(ckpts / "step_00000004"), str(tmp_path / "hf"), "--no-progress")
    assert f"{weights} is 1,000 bytes, the manifest says" in line
    # the checkpoints dir: the newest complete one, with a warning naming the damaged file
    assert main(["convert", "--to", "hf", str(ckpts), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert f"{weights} is 1,000 bytes" in capsys.readouterr().err
    assert (tmp_path / "hf/model.safetensors").is_file()


def test_debug_shows_the_traceback(tmp_path, corpus):
    with pytest.raises(UserError, match="--set: expected KEY=VALUE"):
        main(["train", "--config", str(write_config(tmp_path, corpus)), "--set", "steps", "--debug"])


def test_generate_reads_the_tokenizer_a_model_dir_carries_and_checks_token_ids(tmp_path, capsys, tiny_tokenizer):
    from segtrain.models.llama import LlamaForCausalLM

    tokenizer = tiny_tokenizer
    config = load_model_config("tiny", {"vocab_size": 400})
    save_pretrained(LlamaForCausalLM(config), config, tmp_path / "final", tokenizer=tokenizer.model_file)
    assert oct((tmp_path / "final/tokenizer.model").stat().st_mode & 0o777) == "0o644"
    model = str(tmp_path / "final")
    assert main(["generate", "--model", model, "--prompt", "The pass key is", "--max-new-tokens", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["prompt_ids"] == tokenizer.encode("The pass key is") and isinstance(row["text"], str)
    line = fails(capsys, "generate", "--model", model, "--prompt-ids", "1,5,400", "--max-new-tokens", "2")
    assert "--prompt-ids: token id 400 is outside the model's vocabulary (0..399)" in line


def test_a_train_run_from_the_shell(tmp_path, corpus):
    """One real (two-step) run: a used folder is refused as one line, and a stale DeepSpeed build lock does not hang."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm/lock").touch()  # what a build killed with -9 leaves behind
    env = {**ENV, "TORCH_EXTENSIONS_DIR": os.fspath(extensions)}
    config = write_config(tmp_path, corpus, steps=2, save_every=2)
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (extensions / "deepspeed_shm_comm/lock").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"segtrain train: error: {tmp_path / 'run'} holds another run" in again.stderr
