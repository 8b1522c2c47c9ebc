"""``tools/bench_decode.py --smoke --fuse both --compare-kernel store=0`` on CPU: every case runs, the fused rows
come after the unfused ones and really ran fused (the models are fused once, in place, between them), and each group
of kernel rows is followed at once by its rows under the compared kernel launch."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unfused_then_fused_rows_in_one_run(tmp_path):
    cmd = [sys.executable, "tools/bench_decode.py", "--smoke", "--fuse", "both", "--compare-kernel", "store=0"]
    run = subprocess.run(cmd + ["--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    seg = [r for r in rows if r["system"] == "seg"]
    assert [r["fused_projections"] for r in seg] == [r["fused"] for r in seg] == [False] * 5 + [True] * 4
    assert [r["name"] for r in seg if r["fused"]] == [
        "smoke seg all25 fused 300 B2",
        "smoke seg none fused 300 B2",
        "smoke seg all25 fused [store=0] 300 B2",
        "smoke seg none fused [store=0] 300 B2",
    ]
    assert [r["kernel"] for r in seg if not r["fused"]] == ["", "", "store=0", "store=0", ""]  # not the sdpa row
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_only_the_systems_asked_for(tmp_path):
    cmd = [sys.executable, "tools/bench_decode.py", "--smoke", "--systems", "hf_eager", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert [r["system"] for r in json.loads((tmp_path / "decode.json").read_text())["rows"]] == ["hf_eager"]
    bad = subprocess.run(cmd[:3] + ["--systems", "seg,vllm"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--systems: vllm" in bad.stderr and "Traceback" not in bad.stderr


def test_a_bad_kernel_launch_stops_in_one_line():
    cmd = [sys.executable, "tools/bench_decode.py", "--smoke", "--compare-kernel", "store=0", "merge=2"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--compare-kernel" in run.stderr and "merge" in run.stderr and "Traceback" not in run.stderr
