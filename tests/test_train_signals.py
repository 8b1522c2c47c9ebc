"""SIGTERM, SIGINT and SIGUSR1 stop training after the current step with a checkpoint; resuming continues the
exact loss sequence; a second Ctrl-C aborts at once; every rank stops at the same step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from train_runs import ENV, ROOT, gpu_env, losses, train, write_config

from segtrain.checkpoint import run as checkpoint
from segtrain.train.signals import StoppedDuringStartup, StopRequest

STEPS = 400  # never reached: the signal stops the run


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run logged fewer than {n} steps (exit {proc.poll()})")


def test_a_relayed_signal_is_one_request_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the terminal ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... then the launcher passes a SIGTERM on: still one request
        os.kill(os.getpid(), signal.SIGINT)  # and a SIGINT relayed right away does not abort either
        assert stop.name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


def test_during_startup_a_signal_stops_at_once_except_inside_a_write():
    stop = StopRequest(announce=False, starting=True)
    with stop, pytest.raises(StoppedDuringStartup) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached: the handler raises
    assert stopped.value.name == "SIGTERM" and stopped.value.signum == signal.SIGTERM

    stop, written = StopRequest(announce=False, starting=True), []
    with stop, pytest.raises(StoppedDuringStartup):
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            written.append("the rest of the write")
        written.append("after the write")  # not reached
    assert written == ["the rest of the write"]

    stop = StopRequest(announce=False, starting=True)
    with stop:
        stop.started()
        os.kill(os.getpid(), signal.SIGUSR1)  # after startup: a request the loop reads after its step
        assert stop.name == "SIGUSR1"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["importing", "after claiming the folder"])
def test_sigterm_during_startup_says_so_and_leaves_nothing_half_written(tmp_path, corpus, when):
    config = write_config(tmp_path, corpus, steps=STEPS, save_every=STEPS)
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    if when == "importing":
        time.sleep(1.0)  # the command is importing torch and loading the config (the first step is seconds away)
    else:
        deadline = time.time() + 300
        while not (run_dir / checkpoint.RUN_FILE).is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # the folder is claimed; the model, engine and data are still ahead
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.splitlines()[-1] == "segtrain train: stopped by SIGTERM during startup, before the first step: nothing was saved"
    assert "Traceback" not in err and "trained to step" not in out
    assert not checkpoint.checkpoint_tags(run_dir / "checkpoints") and not losses_if_any(run_dir)
    checkpoint.plan_start(run_dir, "none", {})  # the folder holds no run: a new one may start there


def losses_if_any(run_dir: Path) -> dict:
    return losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}


def test_sigterm_stops_after_the_step_and_resume_continues_exactly(tmp_path, corpus):
    (tmp_path / "ref").mkdir()
    (tmp_path / "sig").mkdir()
    reference = write_config(tmp_path / "ref", corpus, steps=STEPS, save_every=STEPS)
    train(reference, "--stop-at", "8")
    config = write_config(tmp_path / "sig", corpus, steps=STEPS, save_every=STEPS)
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "sig/run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: finishing this step" in err
    stopped = max(losses(tmp_path / "sig/run"))
    ckpts = tmp_path / "sig/run/checkpoints"
    assert f"stopped by SIGTERM after step {stopped}; checkpoint {ckpts / checkpoint.tag_for(stopped)}" in err
    tag = checkpoint.tag_for(stopped)
    assert checkpoint.latest_tag(ckpts) == tag and checkpoint.problem(ckpts / tag) is None
    if stopped < 8:
        train(config, "--resume", "auto", "--stop-at", "8")
    resumed, expected = losses(tmp_path / "sig/run"), losses(tmp_path / "ref/run")
    assert resumed == {s: expected[s] for s in resumed}  # bit-exact, each step logged once
    assert len((tmp_path / "sig/run/metrics.jsonl").read_text().splitlines()) == len(resumed)


DRIVER = r"""
import os, signal, sys, time
from segtrain.train.config import load_train_config
from segtrain.train.loop import train

def signal_during_save(partial):
    if partial.name.startswith("step_00000002"):
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        if sys.argv[3] == "twice":  # a person pressing Ctrl-C again, later than a launcher's relay
            time.sleep(1.5)
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))

summary = train(load_train_config(sys.argv[1]), progress=False, before_commit=signal_during_save)
print("stopped_by", summary["stopped_by"], "step", summary["step"])
"""


def test_a_signal_during_a_save_completes_it_and_stops_after_the_next_step(tmp_path, corpus):
    config = write_config(tmp_path, corpus, steps=6, save_every=2)
    cmd = [sys.executable, "-c", DRIVER, os.fspath(config), "SIGUSR1", "once"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped_by SIGUSR1 step 3" in result.stdout
    ckpts = tmp_path / "run/checkpoints"
    assert checkpoint.checkpoint_tags(ckpts) == ["step_00000002", "step_00000003"]
    assert checkpoint.latest_tag(ckpts) == "step_00000003"


def test_a_second_ctrl_c_aborts_at_once(tmp_path, corpus):
    config = write_config(tmp_path, corpus, steps=6, save_every=2)
    cmd = [sys.executable, "-c", DRIVER, os.fspath(config), "SIGINT", "twice"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 128 + signal.SIGINT
    assert "second Ctrl-C: aborting without saving; the last checkpoint is none" in result.stderr
    assert "Traceback" not in result.stderr and "stopped_by" not in result.stdout
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "step_00000002.partial").is_dir() and checkpoint.latest_tag(ckpts) is None


def test_every_rank_stops_at_the_same_step(tmp_path, corpus):
    """Only rank 1 gets the signal; both ranks stop after the same step and write one complete checkpoint."""
    signal_one_rank(tmp_path, corpus, ENV)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.device_count() >= 2, reason="needs 2 CUDA GPUs")
def test_every_rank_stops_at_the_same_step_over_nccl(tmp_path, corpus):
    """The same on two GPUs: the stop flag rides the loss all-reduce over NCCL."""
    model = {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "attention_backend": "math"}
    signal_one_rank(tmp_path, corpus, gpu_env(), model=model)


def signal_one_rank(tmp_path: Path, corpus: str, env: dict, **fields) -> None:
    from spawned import free_port

    config = write_config(tmp_path, corpus, steps=STEPS, save_every=STEPS, micro_batch_size=1, **fields)
    cmd = [os.fspath(ROOT / "launch/train.sh"), "--launcher", "torchrun", "--nproc", "2", os.fspath(config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "MASTER_PORT": str(free_port())}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        wait_for_rows(tmp_path / "run", 2, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "segtrain.cli" in " ".join(p.cmdline())]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpts = tmp_path / "run/checkpoints"
    tag = checkpoint.latest_tag(ckpts)
    assert tag is not None and checkpoint.problem(ckpts / tag) is None, err[-3000:]
    assert {p.name for p in (ckpts / tag).glob("rng_rank*.pt")} == {"rng_rank00000.pt", "rng_rank00001.pt"}
    assert checkpoint.step_of(tag) == max(losses(tmp_path / "run"))
