"""The training loop end to end on CPU: loss goes down, resume is exact, DP=2 equals DP=1, bad configs
stop early, a kill mid-save leaves the previous checkpoint loadable."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_runs import ENV, ROOT, losses, torchrun, train, write_config

from segtrain.checkpoint import run as checkpoint
from segtrain.config import ConfigError, load_model_config
from segtrain.parallel.groups import LayoutError, make_layout
from segtrain.policy import PolicyError
from segtrain.train.config import load_train_config


@pytest.mark.slow
def test_training_reduces_loss_and_exports_a_model(tmp_path, corpus):
    config = write_config(tmp_path, corpus, steps=40, save_every=40)
    train(config)
    run = tmp_path / "run"
    curve = losses(run)
    assert curve[40] < curve[1] - 1.0, curve  # random tokens stay at ln(1024) = 6.93; counting is learnable
    # the loop's phases are each logged step's whole wall time: the time between steps that tokens_per_s measures
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    phases = [[r[f"time_{p}_s"] for p in ("data", "step", "host", "save")] for r in rows]
    assert all(t >= 0 for row in phases for t in row) and all(r["time_step_s"] > 0 for r in rows)
    misfit = sorted(abs(sum(t) * r["tokens_per_s"] / (2 * 128) - 1) for t, r in zip(phases[1:], rows[1:]))
    assert misfit[len(misfit) // 2] < 0.1, misfit
    from segtrain.checkpoint import load_pretrained

    model = load_pretrained(run / "final")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segtrain.cli",
            "generate",
            "--model",
            os.fspath(run / "final"),
            "--prompt-ids",
            "10,11,12,13,14",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert model.config.segment_size == 32 and out.stdout.strip()


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, corpus):
    whole = write_config(tmp_path / "a", corpus) if (tmp_path / "a").mkdir() is None else None
    train(whole)
    split = write_config(tmp_path / "b", corpus) if (tmp_path / "b").mkdir() is None else None
    train(split, "--stop-at", "3")
    assert checkpoint.latest_tag(tmp_path / "b/run/checkpoints") == "step_00000003"
    train(split, "--resume", "auto")
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run")  # bit-exact, steps 1..6


@pytest.mark.slow
def test_two_processes_over_gloo_equal_one_with_double_micro_batch(tmp_path, corpus):
    (tmp_path / "dp1").mkdir()
    (tmp_path / "dp2").mkdir()
    dp1 = write_config(tmp_path / "dp1", corpus, micro_batch_size=2)
    dp2 = write_config(tmp_path / "dp2", corpus, micro_batch_size=1)
    train(dp1)
    torchrun(dp2, 2)
    one, two = losses(tmp_path / "dp1/run"), losses(tmp_path / "dp2/run")
    assert one.keys() == two.keys() == set(range(1, 7))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)


@pytest.mark.parametrize(
    "fields, error, match",
    [
        (dict(stpes=3), ConfigError, "stpes: unknown key"),
        (dict(optim__lrr=1.0), ConfigError, "optim.lrr: unknown key"),
        (dict(data__seq_length=100), ConfigError, "data.seq_length: 100 is not a multiple of model.segment_size=32"),
        (dict(model={"from": "configs/model/tiny.yaml", "history_policy": [["all", "none"]]}), ConfigError, "history_policy"),
        (
            dict(data__prefixes=["/nonexistent/corpus"]),
            ConfigError,
            r"data.prefixes\[0\]: /nonexistent/corpus.bin does not exist",
        ),
        (dict(parallel__zero_stage=4), ConfigError, "parallel.zero_stage"),
        (dict(micro_batch_size=0), ConfigError, "micro_batch_size: must be a positive integer"),
        (dict(optim__warmup_steps=0), ConfigError, "optim.warmup_steps: must be a positive integer"),
        (dict(data__loss_average="row"), ConfigError, "data.loss_average: must be 'token' or 'sample', got 'row'"),
        (dict(model={"from": "configs/model/nope.yaml"}), ConfigError, "model.from: configs/model/nope.yaml does not exist"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, corpus, fields, error, match):
    with pytest.raises(error, match=match):
        load_train_config(write_config(tmp_path, corpus, **fields))


def test_bad_policy_string_is_named(tmp_path, corpus):
    with pytest.raises((ConfigError, PolicyError), match="windw:4"):
        load_train_config(write_config(tmp_path, corpus, model={"from": "configs/model/tiny.yaml", "history_policy": "windw:4"}))


@pytest.mark.slow
def test_a_layout_that_does_not_divide_the_world_stops_before_the_model(tmp_path, corpus):
    with pytest.raises(LayoutError, match="does not divide the world size 4"):
        make_layout(4, tp=3)
    result = train(write_config(tmp_path, corpus, parallel__tp=2), check=False)
    assert result.returncode == 2
    assert "parallel.tp x parallel.pp x parallel.cp = 2 x 1 x 1 = 2 does not divide the world size 1" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written: no model, no engine


PAUSE_IN_SAVE = r"""
import sys, time
from pathlib import Path
from segtrain.train.config import load_train_config
from segtrain.train.loop import train

def pause(partial: Path) -> None:  # the save of step 4 is written but not committed: the test kills us here
    if partial.name.startswith("step_00000004"):
        (partial.parent / "SAVING").touch()
        time.sleep(120)

train(load_train_config(sys.argv[1]), progress=False, before_commit=pause)
"""


@pytest.mark.slow
def test_killed_during_save_leaves_the_previous_checkpoint(tmp_path, corpus):
    config = write_config(tmp_path, corpus, save_every=2)
    cmd = [sys.executable, "-c", PAUSE_IN_SAVE, os.fspath(config)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = tmp_path / "run/checkpoints/SAVING"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the save at step 4 never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "step_00000004.partial").is_dir() and not (ckpts / "step_00000004").exists()
    assert checkpoint.latest_tag(ckpts) == "step_00000002"
    marker.unlink()
    train(config, "--resume", "auto")  # picks up at step 2 and finishes
    assert checkpoint.latest_tag(ckpts) == "step_00000006"
    assert not (ckpts / "step_00000004.partial").exists()


def test_model_from_resolves_outside_the_repo_root(tmp_path, corpus, monkeypatch):
    """Shipped train configs name ``configs/model/...``: they load from any working directory, and so do flavor names."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, corpus, model={"from": "configs/model/tiny.yaml"})
    assert load_train_config(config).model.num_layers == load_model_config("tiny").num_layers
    config = write_config(tmp_path, corpus, model="tiny")
    assert load_train_config(config).model.hidden_size == load_model_config("tiny").hidden_size


def test_a_backend_without_a_backward_here_is_refused_before_training():
    from types import SimpleNamespace

    import torch

    from segtrain.attention.backends import check_trains
    from segtrain.train.loop import _check_backend_trains

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for ok in ("auto", "math", "reference"):
        check_trains(ok, cpu)
    check_trains("flex", cuda)  # whether flex trains depends on the device type alone
    with pytest.raises(ConfigError, match=r"^model.attention_backend: 'flex' cannot train on cpu: it needs a CUDA GPU"):
        _check_backend_trains(SimpleNamespace(model=SimpleNamespace(attention_backend="flex")), cpu)
