"""``tools/tune_decode_attention.py --smoke``: every launch of a small sweep runs (Triton's interpreter, CPU; a
second launch merging, or the split kernel), agrees with the default's output, and the best launch is one that was timed
in every case."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_the_sweep_on_cpu(tmp_path):
    cmd = [sys.executable, "tools/tune_decode_attention.py", "--smoke", "--merge", "0,1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "tune_decode_attention.json").read_text())
    rows = report["rows"]
    assert len({r["case"] for r in rows}) == 2 and len({r["launch"] for r in rows}) == 3
    assert all("ms" in r and r["max_diff_vs_default"] < 1e-5 for r in rows), rows
    assert {"merge=1" in r["launch"] for r in rows} == {True, False}  # the merge in the same launch agrees too
    assert report["best"]["launch"] in {r["launch"] for r in rows}
    assert f"SEGTRAIN_DECODE_KERNEL={report['best']['launch']}" in run.stdout


def test_a_bad_case_stops_in_one_line():
    cmd = [sys.executable, "tools/tune_decode_attention.py", "--cases", "128K:1:most"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--cases: '128K:1:most'" in run.stderr and "Traceback" not in run.stderr


def test_no_replays_stops_in_one_line():
    cmd = [sys.executable, "tools/tune_decode_attention.py", "--replays", "0"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--replays must be at least 1" in run.stderr and "Traceback" not in run.stderr
