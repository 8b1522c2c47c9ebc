"""Progress in a log file is short lines (no carriage returns); on a terminal it is tqdm's bar."""

import io
import os
import subprocess
import sys
from pathlib import Path

from segtrain.progress import ProgressLines, show_progress

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_a_file_gets_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert type(show_progress(total=3, desc="x")).__name__ == "tqdm"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(show_progress(total=3, desc="x"), ProgressLines)
    assert type(show_progress(total=3, desc="x", enabled=False)).__name__ == "tqdm"  # disabled: tqdm's no-op


def test_lines_come_at_the_first_step_each_tenth_and_the_end():
    out = io.StringIO()
    bar = ProgressLines(total=200, desc="train", stream=out, every_s=1e9)
    for step in range(200):
        bar.set_postfix(loss=1.0 / (step + 1), lr="1.0e-03")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split()[1] for line in lines] == ["1/200"] + [f"{20 * k}/200" for k in range(1, 11)]
    assert lines[0].startswith("train 1/200 (0%) ") and " it/s eta " in lines[0] and lines[0].endswith("loss=1 lr=1.0e-03")
    assert lines[-1].startswith("train 200/200 (100%) ") and " in " in lines[-1] and "eta" not in lines[-1]


def test_lines_every_few_seconds_between_tenths():
    ticks = iter(range(0, 10_000, 10))  # each reading of the clock: 10 s later
    out = io.StringIO()
    bar = ProgressLines(total=1000, desc="calibrate", initial=500, stream=out, every_s=25, clock=lambda: next(ticks))
    for _ in range(6):
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["501/1000", "504/1000"]  # the first step, then 30 s later
    assert "(50%) 0.1 it/s eta 1h" in lines[-1]  # 4 steps (resumed from 500) in 40 s: 496 left at 0.1/s


def test_bytes_and_unknown_totals_read_as_amounts():
    out = io.StringIO()
    with ProgressLines(total=3 * 2**30, desc="to hf", unit_bytes=True, stream=out, every_s=1e9) as bar:
        for _ in range(3):
            bar.update(2**30)
    assert out.getvalue().splitlines()[-1].startswith("to hf 3.0 GiB/3.0 GiB (100%) ")
    out = io.StringIO()
    for _ in ProgressLines(iter(range(5)), desc="tokenize -> d", unit="doc", stream=out):
        pass
    assert out.getvalue().splitlines()[-1].startswith("tokenize -> d 5 doc ")


def test_a_command_logging_to_a_file_writes_short_lines(tmp_path):
    """What a batch job's log gets from a real loop: several lines, each short, no carriage return (tqdm wrote one
    line of tens of kilobytes)."""
    script = (
        "from segtrain.progress import show_progress\n"
        "bar = show_progress(total=500, desc='train')\n"
        "for i in range(500):\n"
        "    bar.set_postfix(loss=f'{1 / (i + 1):.4f}', tok_s=f'{1000 + i:,}', lr=f'{i * 1e-5:.2e}')\n"
        "    bar.update(1)\n"
        "bar.close()\n"
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        subprocess.run([sys.executable, "-c", script], stderr=stderr, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) >= 5 and max(map(len, lines)) <= 200, lines
    assert lines[-1].startswith("train 500/500 (100%)")
