"""``tools/bench_decode.py --smoke --fuse both`` on CPU: every case runs, and the fused rows come after the unfused
ones and really ran fused (the models are fused once, in place, between them)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unfused_then_fused_rows_in_one_run(tmp_path):
    cmd = [sys.executable, "tools/bench_decode.py", "--smoke", "--fuse", "both", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    seg = [r for r in rows if r["system"] == "seg"]
    assert [r["fused_projections"] for r in seg] == [r["fused"] for r in seg] == [False, False, False, True, True]
    assert {r["name"] for r in seg if r["fused"]} == {"smoke seg all25 fused 300 B2", "smoke seg none fused 300 B2"}
    assert all(r["seconds_per_step"] > 0 for r in rows)
