"""The training run directory: manifests, damaged checkpoints, pruning, who owns a folder.

A fake engine writes and reads one ``mp_rank_00_model_states.pt`` the way DeepSpeed does, so most cases here run in
milliseconds; :func:`test_with_a_real_deepspeed_engine` runs the same run directory with DeepSpeed's own engine (ZeRO-1
optimizer shards, its ``(None, None)`` load return) in a child process, and tests/test_train.py the whole loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import FakeEngine

from segtrain.checkpoint import run
from segtrain.checkpoint.run import CheckpointError, claim, find_checkpoint, plan_start, problem
from segtrain.train.metrics import MetricsLog, StepTimes

CONFIG = {"model": {"hidden_size": 64, "num_layers": 2}, "optim": {"lr": 0.003}, "steps": 10, "out_dir": "x"}


def save(ckpts: Path, step: int, keep_last: int = 0, config=CONFIG) -> Path:
    return run.save(FakeEngine(), ckpts, step, {"step": step, "consumed_samples": step, "config": config}, keep_last=keep_last)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_a_save_lists_every_file_with_its_size(tmp_path):
    step_dir = save(tmp_path, 3)
    files = json.loads((step_dir / run.MANIFEST).read_text())["files"]
    assert set(files) == {"mp_rank_00_model_states.pt", "rng_rank00000.pt", run.TRAINER_STATE}
    assert all(files[name] == (step_dir / name).stat().st_size for name in files)
    assert problem(step_dir) is None and (tmp_path / run.LATEST).read_text() == "step_00000003\n"


def test_pruning_keeps_the_new_checkpoint_and_leaves_newer_ones(tmp_path):
    for step in (3, 6, 9):
        save(tmp_path, step, keep_last=2)
    assert run.checkpoint_tags(tmp_path) == ["step_00000006", "step_00000009"]
    (tmp_path / "step_00000004.partial").mkdir()  # a save that was killed
    save(tmp_path, 500)
    save(tmp_path, 12, keep_last=2)  # a run resumed from step 9 in a folder that also holds step 500
    assert run.checkpoint_tags(tmp_path) == ["step_00000009", "step_00000012", "step_00000500"]
    assert not (tmp_path / "step_00000004.partial").exists()
    assert (tmp_path / run.LATEST).read_text().strip() == "step_00000012"  # the new one, not the highest number
    save(tmp_path, 15, keep_last=1)
    assert run.checkpoint_tags(tmp_path) == ["step_00000015", "step_00000500"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(d / "mp_rank_00_model_states.pt"), r"mp_rank_00_model_states.pt is [\d,]+ bytes, the manifest says"),
        (lambda d: (d / "rng_rank00000.pt").unlink(), "rng_rank00000.pt is missing"),
        (lambda d: (d / run.TRAINER_STATE).write_text("{not json"), "trainer_state.json is not valid JSON"),
        (lambda d: (d / run.MANIFEST).write_text("[]"), "manifest.json is not a valid manifest"),
        (lambda d: (d / run.TRAINER_STATE).unlink(), "trainer_state.json is missing"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, message):
    save(tmp_path, 2)
    damage(save(tmp_path, 4))
    assert problem(tmp_path / "step_00000004") is not None
    warnings = []
    assert find_checkpoint(tmp_path, warn=warnings.append) == "step_00000002"
    assert len(warnings) == 1 and "latest names step_00000004" in warnings[0] and "step_00000002" in warnings[0]
    assert pytest.raises(CheckpointError, find_checkpoint, tmp_path, "step_00000004").match(message)
    damage(tmp_path / "step_00000002")
    expected = rf"no complete checkpoint in {tmp_path}: latest names step_00000004, but .*{message}"
    with pytest.raises(CheckpointError, match=expected):
        find_checkpoint(tmp_path)


def test_latest_naming_a_missing_checkpoint_or_missing_itself(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / run.LATEST).write_text("step_00000009\n")
    warnings = []
    assert find_checkpoint(tmp_path, warn=warnings.append) == "step_00000004"
    assert "latest names step_00000009, but" in warnings[0] and "does not exist" in warnings[0]
    (tmp_path / run.LATEST).unlink()
    assert find_checkpoint(tmp_path, warn=warnings.append) == "step_00000004"
    assert "latest is missing" in warnings[1]


def test_a_checkpoint_from_before_manifests_still_loads(tmp_path):
    (save(tmp_path, 2) / run.MANIFEST).unlink()
    assert find_checkpoint(tmp_path) == "step_00000002"
    engine = FakeEngine()
    assert run.load(engine, tmp_path)["step"] == 2 and engine.loaded is not None


def test_a_foreign_file_of_the_right_size_is_named_on_load(tmp_path):
    file = save(tmp_path, 2) / "mp_rank_00_model_states.pt"
    file.write_bytes(b"\0" * file.stat().st_size)
    with pytest.raises(CheckpointError, match="step_00000002: cannot be loaded"):
        run.load(FakeEngine(), tmp_path)


def test_a_new_run_refuses_a_folder_holding_another(tmp_path):
    out = tmp_path / "run"
    assert plan_start(out, "none", CONFIG).tag is None  # empty: a new run
    claim(out, plan_start(out, "none", CONFIG), CONFIG)
    assert json.loads((out / run.RUN_FILE).read_text())["config_hash"] == run.config_hash(CONFIG)
    save(out / "checkpoints", 5)
    for resume in ("none", str(tmp_path / "elsewhere")):
        if resume != "none":
            save(Path(resume), 7)
        expected = f"{out} holds another run .checkpoints up to step_00000005, started .*same config"
        with pytest.raises(CheckpointError, match=expected):
            plan_start(out, resume, CONFIG)
    start = plan_start(out, "none", CONFIG, overwrite=True)
    claim(out, start, CONFIG, overwrite=True)
    assert not (out / "checkpoints").exists()
    (out / "final").mkdir()  # a finished run whose checkpoints are gone
    with pytest.raises(CheckpointError, match="holds another run .a final model.*choose another out_dir"):
        plan_start(out, "auto", CONFIG)


def test_resume_takes_auto_a_step_a_tag_or_a_folder(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    save(ckpts, 5)
    save(ckpts, 10)
    assert plan_start(out, "auto", CONFIG).tag == "step_00000010"
    start = plan_start(out, "5", CONFIG)
    assert (start.source, start.tag) == (ckpts, "step_00000005")
    assert any("step_00000010 exists here" in note for note in start.notes)
    assert plan_start(out, "step_00000005", CONFIG).tag == "step_00000005"
    assert plan_start(out, str(ckpts / "step_00000005"), CONFIG).tag == "step_00000005"
    assert plan_start(out, str(ckpts), CONFIG).tag == "step_00000010"
    assert plan_start(out, str(out), CONFIG).tag == "step_00000010"
    expected = r"checkpoint step_00000020: .* does not exist \(checkpoints here: step_00000005, step_00000010\)"
    with pytest.raises(CheckpointError, match=expected):
        plan_start(out, "step_00000020", CONFIG)
    with pytest.raises(CheckpointError, match="--resume: 'atuo' is not 'auto', 'none', a step number or a checkpoint folder"):
        plan_start(out, "atuo", CONFIG)
    assert plan_start(tmp_path / "fresh", "auto", CONFIG).tag is None


def test_resume_stops_on_another_model_shape_and_notes_other_changes(tmp_path):
    out = tmp_path / "run"
    save(out / "checkpoints", 5)
    wider = {**CONFIG, "model": {**CONFIG["model"], "hidden_size": 128}}
    with pytest.raises(CheckpointError, match="was trained with model.hidden_size=64, the config says 128"):
        plan_start(out, "auto", wider)
    notes = plan_start(out, "auto", {**CONFIG, "optim": {"lr": 0.001}, "steps": 20}).notes
    changes = "optim.lr: 0.003 -> 0.001, steps: 10 -> 20"
    assert notes == [f"resuming {out / 'checkpoints/step_00000005'} with a changed config ({changes})"]


def test_step_times_split_the_wall_time_between_logs_per_step(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 4.5, 5.0, 7.0, 7.25, 9.0])  # created; then data, step, host, data, step, host, save
    monkeypatch.setattr("segtrain.train.metrics.time.perf_counter", lambda: next(clock))
    times = StepTimes()
    for phase in ("data", "step", "host", "data", "step", "host", "save"):
        times.lap(phase)
    assert times.means() == {"time_data_s": 0.75, "time_step_s": 2.5, "time_host_s": 0.375, "time_save_s": 0.875}
    assert times.means() == dict.fromkeys(("time_data_s", "time_step_s", "time_host_s", "time_save_s"), 0.0)


def test_metrics_keep_each_step_once_after_a_resume(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 8):
        log.log(step, loss=float(step))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a line cut short by a kill
    log = MetricsLog(tmp_path, tensorboard=False, start_step=5)  # the checkpoint was at step 5
    log.log(6, loss=60.0)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 60.0


def real_engine_checks(out: Path) -> None:
    """The run directory with DeepSpeed's engine (CPU, ZeRO-1, a world of one). Runs in a child process: DeepSpeed
    picks its accelerator and joins a process group once per process."""
    import shutil

    from segtrain.parallel.groups import setup

    setup("cpu")
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def train_and_save(step, keep_last=0):
        engine(torch.randn(1, 8)).sum().backward()
        engine.step()
        return run.save(engine, out, step, {"step": step, "consumed_samples": step, "config": CONFIG}, keep_last=keep_last)

    def weights():
        return [p.detach().clone() for p in engine.module.parameters()]

    # every file DeepSpeed writes (model and ZeRO optimizer states) is in the manifest, with its size
    step_dir = train_and_save(2)
    written = {p.name: p.stat().st_size for p in step_dir.iterdir() if p.name != run.MANIFEST}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(written), written
    assert json.loads((step_dir / run.MANIFEST).read_text())["files"] == written
    train_and_save(4, keep_last=2)
    at_step_4 = weights()
    train_and_save(6, keep_last=2)
    assert run.checkpoint_tags(out) == ["step_00000004", "step_00000006"]

    # a damaged optimizer shard: the load falls back to step 4 and restores the weights DeepSpeed saved there
    truncate(out / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not all(torch.equal(a, b) for a, b in zip(weights(), at_step_4))
    assert run.load(engine, out)["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(weights(), at_step_4))

    # DeepSpeed 0.19.8 returns (None, None) when asked for the latest checkpoint of a folder without `latest` (with a
    # tag it raises instead). segtrain always names the tag, so that return reaches run.load only from an engine that
    # asks for the latest one: the real engine behind such a call, and the CheckpointError naming it
    copied = out.parent / "copied"
    shutil.copytree(out / "step_00000004", copied / "step_00000004")  # a checkpoint folder copied without `latest`
    assert engine.load_checkpoint(str(copied), tag=None) == (None, None)

    class AsksForLatest:
        def load_checkpoint(self, load_dir, tag):
            return engine.load_checkpoint(load_dir, tag=None)

    try:
        run.load(AsksForLatest(), copied)
    except CheckpointError as e:
        assert "DeepSpeed found no model states to load" in str(e), e
    else:
        raise AssertionError("run.load took DeepSpeed's (None, None) for a loaded checkpoint")
    print("real engine checks passed")


@pytest.mark.slow
def test_with_a_real_deepspeed_engine(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(root), os.fspath(root / "tests")]), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    code = f"from pathlib import Path; import test_checkpoint_run as t; t.real_engine_checks(Path({os.fspath(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "real engine checks passed" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
