"""The README's main job: the tiny model learns to fetch a pass key from beyond its previous segment, segmented
generation answers held-out samples (and fails without history), and the printed next command runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
def test_demo_learns_retrieval_from_history(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "segtrain.cli", "demo", "--out", os.fspath(out), "--samples", "50"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    stages = ("[1/4] tokenizer", "[2/4] training", "trained 200 steps", "[3/4] 50 held-out samples", "[4/4] example", "next:")
    assert all(stage in text for stage in stages), text
    assert re.search(r"the key sits [34] to [34] segments before the answer", text), text
    trained = float(re.search(r"as trained: +([\d.]+)% exact", text).group(1))
    blind = float(re.search(r"history off: +([\d.]+)% exact", text).group(1))
    assert trained >= 80 and blind <= 40, text
    final = out / "train/final"
    assert {p.name for p in final.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert (out / "data/corpus.bin").is_file() and (out / "data/corpus.idx").is_file()  # what configs/train/tiny.yaml reads
    # the first printed next command, run as written (the model dir carries its tokenizer)
    generate = next(line.strip() for line in text.splitlines() if line.strip().startswith("segtrain generate"))
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shell = generate.replace("segtrain generate", f"{sys.executable} -m segtrain.cli generate", 1)
    answer = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    demo_answer = re.search(r"\[4/4\] example: .* -> '(.*)' \(answer", text).group(1)
    assert answer.stdout.strip() == demo_answer.strip() and demo_answer.strip().isdigit(), (answer.stdout, demo_answer)
