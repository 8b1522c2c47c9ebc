"""The README's main job, shortened: corpus -> tokenizer -> indexed data -> training -> segmented generation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "segtrain.cli",
            "demo",
            "--out",
            os.fspath(out),
            "--steps",
            "8",
            "--corpus-bytes",
            "300000",
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5] trained 8 steps", "[5/5]"):
        assert step in result.stdout
    assert (out / "train/final/model.safetensors").is_file()
    assert (out / "train/checkpoints/latest").read_text().strip() == "step_00000008"
