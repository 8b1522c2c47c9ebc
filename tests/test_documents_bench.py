"""``tools/bench_documents.py --tiny`` on CPU: both modes run on the same packed tokens, JSON, plot and table come out."""

import json
from pathlib import Path

import pytest
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_document_lengths_are_seeded_long_tailed_and_fill_the_sequence():
    bench = load_tool("bench_documents")
    lengths = bench.document_lengths(32768, 4096, seed=0)
    assert sum(lengths) == 32768 and lengths == bench.document_lengths(32768, 4096, seed=0)
    many = [n for seed in range(20) for n in bench.document_lengths(32768, 4096, seed=seed)[:-1]]  # uncut ones
    mean = sum(many) / len(many)
    assert 2048 < mean < 8192 and max(many) > 3 * mean and min(many) >= 64


def test_tiny_run_writes_json_plot_and_table(tmp_path, capsys):
    bench = load_tool("bench_documents")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_documents.json").read_text())
    assert report["meta"]["documents"] > 2 and sum(report["meta"]["lengths"]) == report["meta"]["T"] == 256
    assert 0 < report["meta"]["pairs"] < 1  # documents alone see fewer keys than one stream
    rows = {(r["backend"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {("math", "stream"), ("math", "documents")}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("GPU: cpu") and lines[-1].startswith("| math | documents |")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_documents.png").stat().st_size > 10_000


def test_a_bad_step_count_stops_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        load_tool("bench_documents").main(["--tiny", "--steps", "0"])
    assert stop.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err


def test_holders_at_peak_reads_what_is_alive_at_the_highest_point():
    """A made-up allocator trace: the peak is reached at the third alloc (a freed block does not count), and blocks
    group by their innermost segtrain frame."""
    ours = [{"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"},
            {"filename": "/r/segtrain/models/llama.py", "line": 150, "name": "forward"}]  # fmt: skip
    theirs = [{"filename": "/x/torch/autograd/graph.py", "line": 3, "name": "run"}]
    mib = 2**20
    events = [
        dict(action="alloc", addr=1, size=4 * mib, frames=ours),
        dict(action="alloc", addr=2, size=1 * mib, frames=theirs),
        dict(action="free_completed", addr=2, size=1 * mib, frames=theirs),
        dict(action="alloc", addr=3, size=2 * mib, frames=ours),
        dict(action="alloc", addr=4, size=3 * mib, frames=theirs),  # the peak: 9 MiB
        dict(action="free_requested", addr=1, size=4 * mib, frames=ours),
        dict(action="alloc", addr=5, size=3 * mib, frames=theirs),  # 8 MiB: below the peak
    ]
    holders = load_tool("bench_documents").holders_at_peak(events)
    assert [(h["where"], h["gib"] * 1024, h["blocks"]) for h in holders] == [
        ("llama.py:150 forward", 6.0, 2),
        ("graph.py:3 run", 3.0, 1),
    ]
