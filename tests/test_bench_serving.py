"""``tools/bench_serving.py --tiny`` on CPU: every case runs, JSON, plot and table come out (the table last, naming the
device), the export's cache stays bounded, and a case that cannot run is one line while the others go on."""

import json
from pathlib import Path

import torch
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_reports_every_case_and_survives_one_that_fails(tmp_path, capsys):
    bench = load_tool("bench_serving")

    def runner(name, models, ids, new_tokens, device, engines):
        if name == "segtrain" and ids.shape[1] == 200:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB\nmore detail")
        return bench.run_case(name, models, ids, new_tokens, device, engines)

    assert bench.main(["--tiny", "--new-tokens", "4", "--out", str(tmp_path)], runner=runner) == 0
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["device"] == "cpu" and report["batch"] == 1 and report["policy"][0] == "all"
    rows = {(r["case"], r["T"]): r for r in report["rows"]}
    assert set(rows) == {(case, T) for case in bench.CASES for T in (96, 200)}
    assert rows["segtrain", 200]["error"] == "out of memory: CUDA out of memory. Tried to allocate 30.00 GiB"
    for key, row in rows.items():
        if key != ("segtrain", 200):
            assert row["prefill_s"] > 0 and row["decode_ms"] > 0 and row["kv_cache_gib"] > 0, key
    assert rows["export", 200]["cache"] == "SegmentCache" and rows["hf_full", 200]["cache"] == "DynamicCache"
    # one head of four reads all history, three at most two segments: well under full attention's cache
    assert rows["export", 200]["kv_cache_gib"] < 0.5 * rows["hf_full", 200]["kv_cache_gib"]
    export = rows["export", 96]
    assert export["tokens_agree_segtrain"] == len(export["tokens"])  # float32: the export generates what segtrain does
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-9] == "GPU: cpu" and lines[-7].startswith("| ---") and "out of memory" in lines[-2]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "serving.png").stat().st_size > 10_000
