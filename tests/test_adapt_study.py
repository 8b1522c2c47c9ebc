"""tools/study_adapt.py without training: its plan (step counts, checkpoints, schedules) and its report (the recovery
curve from records, the first line saying whether the study was cut short). The whole pipeline on CPU:
``python tools/study_adapt.py --smoke --seeds 1 --work /tmp/adapt_smoke --out /tmp/adapt_smoke/out`` (~5 min)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[1]


sa = load_tool("study_adapt")


def test_plan_sizes_every_run_in_steps(tmp_path):
    args = sa.parse_args(["--work", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "2000"])
    cal = {f"A-s{s}": {"policy": [["all", "none", "none", "none"]] * 4, "path": str(tmp_path / f"A-s{s}-cal")} for s in (0, 1)}
    phases = sa.plan(args, tmp_path / "data", tmp_path, "cuda", cal)
    runs = {r.arm.name: r for p in phases.values() for r in p}
    assert set(runs) == {"init", "A-s0", "A-s1", "As-s0", "As-s1", "B-s0", "E-s0", "E-s1", "Ecal-s0", "Ecal-s1",
                         "Xfull-s0", "Xfull-s1", "Xseg-s0", "Xseg-s1"}  # fmt: skip
    e = runs["E-s0"]
    assert e.checkpoints == {100: "5%", 200: "10%", 500: "25%", 1000: "50%"}  # of A's 2000 steps
    assert e.config["steps"] == 1000 and e.config["save_every"] == 100  # every fraction is a checkpoint
    assert e.config["optim"]["lr"] == e.config["optim"]["min_lr"] == args.lr / 3  # constant after warmup
    assert e.init_from == tmp_path / "A-s0" / "final" and e.arm.policy == sa.sc.B_POLICY
    assert runs["Ecal-s1"].init_from == tmp_path / "A-s1-cal" and runs["Ecal-s1"].arm.policy == cal["A-s1"]["policy"]
    a, short, xfull, xseg = (runs[n].config for n in ("A-s0", "As-s0", "Xfull-s0", "Xseg-s0"))
    assert short["data"]["seq_length"] * 4 == a["data"]["seq_length"] == xfull["data"]["seq_length"]
    tokens = [c["micro_batch_size"] * c["data"]["seq_length"] for c in (a, short, xfull)]
    assert tokens[0] == tokens[1] == tokens[2]  # the same tokens per step
    assert short["steps"] + xfull["steps"] == a["steps"] and xfull["steps"] == xseg["steps"] == 500
    assert runs["Xseg-s0"].arm.segment_size == args.segment_size and runs["Xfull-s0"].arm.segment_size == a["data"]["seq_length"]


def _record(model, mode, length, history, own=1.0):
    cell = lambda acc: {"correct": round(10 * acc), "total": 10}  # noqa: E731
    return {"model": model, "mode": mode, "length": length,
            "retrieval": {"passkey": {"own": cell(own), "previous": cell(1.0), "history": cell(history)}}}  # fmt: skip


def results(cut=()):
    records = []
    for length in (1024, 2048):
        for s, base in ((0, 0.1), (1, 0.3)):
            records.append(_record(f"A-s{s}", "full", length, 1.0))
            records.append(_record(f"A-s{s}", sa.FIRST_K, length, base))
            records.append(_record(f"A-s{s}", sa.CALIBRATED, length, base + 0.2))
            for f, gain in (("5%", 0.2), ("50%", 0.6)):
                records.append(_record(f"E-s{s}", f, length, base + gain))
                records.append(_record(f"Ecal-s{s}", f, length, base + gain + 0.1, own=0.5 if length == 2048 else 1.0))
        records.append(_record("B-s0", "own", length, 0.9))
    runs = {n: {"policy": "all", "seq_length": 1024, "segment_size": 1024, "seed": 0, "init_from": None, "steps": 10,
                "steps_done": 10, "lr": [1e-3, 1e-3], "tokens_per_s": 1000.0} for n in ("A-s0", "E-s0")}  # fmt: skip
    study = {"finished": not cut, "cut": list(cut), "device": "test", "timings": {"init_s": 1.0}, "commands": ["x"],
             "model": {"hidden_size": 8, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "vocab_size": 10},
             "parameters": 1e6, "precision": "fp32", "seq_length": 1024, "segment_size": 128, "steps": 100,
             "micro_batch": 8, "lr": 3e-3, "warmup": 5, "ft_lr": 1e-3, "ft_warmup": 5, "fractions": [0.05, 0.5],
             "ext_fraction": 0.25, "seeds": 2, "b_seeds": 1, "synthetic_fraction": 0.5, "tasks": ["passkey"],
             "task_options": {}, "init_steps": 10, "init_length": 256, "init_micro_batch": 32, "calibrate_steps": 5,
             "runs": runs, "calibration": {}, "loss_curves": {}}  # fmt: skip
    return {"study": study, "records": records}


def test_recovery_curve_is_read_from_the_records():
    rows = {label: (e, c) for label, _, e, c in sa.recovery(results(), 1024)}
    e, c = rows["0% (A segmented at inference)"]
    assert [round(x, 2) for x in e] == [0.1, 0.3] and [round(x, 2) for x in c] == [0.3, 0.5]
    e, c = rows["50%"]
    assert [round(x, 2) for x in e] == [0.7, 0.9] and [round(x, 2) for x in c] == [0.8, 1.0]
    table = "\n".join(sa.recovery_table(results()))
    assert "| 50% | 80% (70%, 90%) | 90% (80%, 100%) |" in table  # E and E-cal at T: mean (per seed)
    assert "| B segtrain from the init (reference) | 90% |" in table
    # at 2T E-cal loses the own bucket B keeps: the report names positions, not the history heads
    lines = "\n".join(sa.at_2t_lines(results()))
    assert "Ecal at 50%" in lines and "positions beyond the trained length" in lines
    assert "E at 50% vs B at 2T=2048: own 100% vs 100%" in lines


def test_first_line_says_whether_the_study_was_cut_short(tmp_path):
    done = sa.render_doc(results())
    assert done.splitlines()[0].startswith("**Complete:**")
    cut = sa.render_doc(results(cut=["finetune: E-s0 at step 3"]))
    assert cut.splitlines()[0].startswith("**NOT FINISHED") and "E-s0 at step 3" in cut.splitlines()[0]
    out = tmp_path / "out"
    sa.write_outputs(copy.deepcopy(results()), out)
    assert {p.name for p in out.iterdir()} >= {"results.json", "adapt.md", "recovery.png"}


@pytest.mark.slow
def test_smoke_stops_at_its_deadline_and_a_rerun_finishes(tmp_path):
    """The whole study on CPU, tiny: the first call stops at --deadline-s with a partial report and exit 0; the rerun
    continues (finished runs are not trained again) and measures E at every fraction, at T and 2T."""
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.fspath(ROOT / "tools/study_adapt.py"), "--smoke", "--seeds", "1", "--b-seeds", "0",
           "--fractions", "0.1,0.5", "--cost-steps", "0", "--work", os.fspath(tmp_path / "work"),
           "--out", os.fspath(tmp_path / "out")]  # fmt: skip
    first = subprocess.run([*cmd, "--deadline-s", "25"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "not finished, rerun to continue" in first.stdout
    assert (tmp_path / "out/adapt.md").read_text().startswith("**NOT FINISHED")
    finished = {d.parents[1].name: d.stat().st_mtime_ns for d in (tmp_path / "work").glob("*/final/model.safetensors")}
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (tmp_path / "out/adapt.md").read_text().startswith("**Complete:**")
    for name, mtime in finished.items():  # what the first call finished, the rerun did not train again
        assert (tmp_path / "work" / name / "final/model.safetensors").stat().st_mtime_ns == mtime, name
    results = json.loads((tmp_path / "out/results.json").read_text())
    measured = {(r["model"], r["mode"], r["length"]) for r in results["records"]}
    for length in (512, 1024):
        assert {("E-s0", "10%", length), ("E-s0", "50%", length), ("Ecal-s0", "50%", length)} <= measured
        assert {("A-s0", m, length) for m in ("full", sa.FIRST_K, sa.CALIBRATED)} <= measured
        assert {("Xfull-s0", "full", length), ("Xseg-s0", "own", length)} <= measured
    assert results["study"]["runs"]["E-s0"]["steps_done"] == 10 and results["study"]["finished"]
