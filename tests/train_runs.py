"""Training runs as the CLI and the launcher start them, for the tests that train end to end: a config file around a
corpus, one process or torchrun's ranks, and the losses a run logged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def write_config(tmp_path: Path, corpus: str, **fields) -> Path:
    cfg = {
        "model": {"from": os.fspath(ROOT / "configs/model/tiny.yaml")},
        "data": {"prefixes": [corpus], "seq_length": 128},
        "steps": 6,
        "micro_batch_size": 2,
        "log_every": 1,
        "save_every": 3,
        "keep_last": 2,
        "out_dir": os.fspath(tmp_path / "run"),
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.0},
    }
    for key, value in fields.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *extra: str, check=True, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, check=check, timeout=600)


def torchrun(config: Path, nproc: int, *extra: str, env=None) -> None:
    """``launch/train.sh`` with torchrun over ``nproc`` processes (a free rendezvous port); fails with its stderr."""
    from spawned import free_port

    cmd = [os.fspath(ROOT / "launch/train.sh"), "--launcher", "torchrun", "--nproc", str(nproc), os.fspath(config)]
    env = {**(env or ENV), "MASTER_PORT": str(free_port())}
    run = subprocess.run([*cmd, "--", "--no-progress", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def gpu_env() -> dict:
    """ENV for GPU launches: DeepSpeed picks its CUDA accelerator, and PYTHONPATH keeps the carried wheel dirs."""
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.fspath(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


class FakeEngine:
    """``save_checkpoint`` / ``load_checkpoint`` as DeepSpeed's engine calls them."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.randn(64, 64)}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, save_dir, tag):
        self.loaded = torch.load(Path(save_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return str(Path(save_dir) / tag), {}
