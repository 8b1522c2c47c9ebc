"""The consistency study's pieces: the natural-text + synthetic training blend (pure per sample, validated), and
``tools/study_consistency.py --smoke``, the whole pipeline on CPU (data, a common init, three arms trained concurrently,
evaluation, the markdown report), so the GPU run's script cannot rot."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tool_scripts import load_tool

from segtrain.config import ConfigError
from segtrain.train.config import DataConfig, TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_file(tiny_tokenizer):
    """conftest's tiny tokenizer (400 pieces)."""
    return tiny_tokenizer.model_file


def blend_config(tmp_path, corpus, tokenizer_file, **data) -> TrainConfig:
    from segtrain.config import load_model_config

    fields = dict(prefixes=[corpus], tokenizer=tokenizer_file, seq_length=256, synthetic="passkey", synthetic_fraction=0.4)
    cfg = TrainConfig(
        model=load_model_config("tiny"), data=DataConfig(**{**fields, **data}), out_dir=str(tmp_path / "run"), seed=7
    )
    return validate(cfg)


def test_blend_is_a_pure_function_of_index_and_seed(tmp_path, corpus, tokenizer_file):
    from segtrain.train.data import BlendedDataset, build_train_dataset

    cfg = blend_config(tmp_path, corpus, tokenizer_file)
    ds = build_train_dataset(cfg, 200)
    assert isinstance(ds, BlendedDataset) and len(ds) >= 200
    kinds = [ds.is_synthetic(i) for i in range(200)]
    assert 0.3 < sum(kinds) / 200 < 0.5  # about synthetic_fraction
    again = build_train_dataset(cfg, 200)  # a resumed run rebuilds the dataset: the same samples
    for i in (0, 1, 2, 3, 57, 199):
        a, b = ds[i], again[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
        mask = torch.as_tensor(a["loss_mask"])
        if kinds[i]:  # synthetic: loss on the answer tokens only
            assert 0 < mask.sum() < 40
        else:  # natural text: the counting corpus, loss on every token
            assert mask.sum() == 256 and torch.as_tensor(a["tokens"]).max() < 1004
    other = BlendedDataset(ds.natural, ds.synthetic, 0.4, seed=8)
    assert [other.is_synthetic(i) for i in range(200)] != kinds  # the seed decides


@pytest.mark.parametrize(
    "data, message",
    [
        (dict(synthetic_fraction=None), "data.synthetic_fraction: data.synthetic and data.prefixes are both set"),
        (dict(synthetic_fraction=1.0), "data.synthetic_fraction: must be between 0 and 1"),
        (dict(synthetic=None), "data.synthetic_fraction: blends data.synthetic with data.prefixes"),
    ],
)
def test_blend_config_errors_name_the_field(tmp_path, corpus, tokenizer_file, data, message):
    with pytest.raises(ConfigError, match=message):
        blend_config(tmp_path, corpus, tokenizer_file, **data)


def _study_module():
    return load_tool("study_consistency")


def test_study_smoke_runs_the_whole_pipeline_on_cpu(tmp_path):
    """A common init, then the arms train (4 steps, concurrently), are evaluated in their modes at T and 2T, and the report
    is written."""
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        os.fspath(ROOT / "tools/study_consistency.py"),
        "--smoke",
        "--out",
        os.fspath(tmp_path / "out"),
        "--work",
        os.fspath(tmp_path / "work"),
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "consistency.md", "retrieval.png", "ppl.png", "train_loss.png", "study.log"]
    )
    results = json.loads((out / "results.json").read_text())
    arms = results["study"]["arms"]
    assert set(arms) == {"A-s0", "B-s0", "D"}  # --smoke's arms: A and B (the verdict) and D (no carry gradient)
    assert all(a["steps_done"] == 4 and a["evaluated_step"] == 4 for a in arms.values())
    init = results["study"]["init"]  # the common init: one candidate per loss setting, the better one chosen
    assert set(init["candidates"]) == {"init-all"} and init["chosen"] == "init-all"
    assert all(c["steps_done"] == 3 and c["retrieval_accuracy"] is not None for c in init["candidates"].values())
    a_modes = ["full", "segmented (B policy)", "segmented (calibrated)"]  # calibrated: segtrain calibrate's heads
    expected = {(a, m, n) for a in arms for m in (a_modes if a[0] == "A" else ["own"]) for n in (512, 1024)}
    calibration = results["study"]["calibration"]
    assert calibration["steps"] == 2 and len(calibration["arms"]["A-s0"]["all_heads"]) == 2  # 25% of 2 layers x 4 KV heads
    assert {(r["model"], r["mode"], r["length"]) for r in results["records"]} == expected  # measured, or marked skipped
    first = results["records"][0]
    assert "skipped" not in first and set(first["retrieval"]) == {"passkey", "needle", "recall"}
    doc = (out / "consistency.md").read_text()
    assert "## Result" in doc and "| A-s0 | full | 512 | passkey |" in doc
    assert "A segmented at inference with calibrated heads" in doc

    # when the guard stopped training, A is calibrated from its training checkpoint (converted to a model dir first)
    study = _study_module()
    args = study.parse_args(["--smoke", "--out", os.fspath(out), "--work", os.fspath(tmp_path / "work")])
    arm = study.selected_arms(args)[0]
    checkpoint = tmp_path / "work" / "A-s0" / "checkpoints" / "step_00000004"
    done = study.calibrate_arms([arm], {"A-s0": {"path": os.fspath(checkpoint)}}, args, tmp_path / "work" / "data",
                                tmp_path / "work", "cpu", 1, time.monotonic() + 300, print)  # fmt: skip
    assert len(done["A-s0"]["all_heads"]) == 2 and (tmp_path / "work" / "A-s0-hf" / "config.json").is_file()

    # the doc regenerates from the JSON alone
    regen = subprocess.run(
        [
            sys.executable,
            os.fspath(ROOT / "tools/study_consistency.py"),
            "--report-from",
            os.fspath(out / "results.json"),
            "--doc",
            os.fspath(tmp_path / "doc/consistency.md"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert regen.returncode == 0, regen.stderr[-2000:]
    assert (tmp_path / "doc/consistency.md").read_text() == doc
    assert (tmp_path / "doc/consistency_retrieval.png").is_file()


@pytest.mark.slow
def test_retrieval_probe_trains_variants_side_by_side_and_keeps_what_it_measured(tmp_path):
    """tools/probe_retrieval.py on CPU: one variant finishes and is saved as a model dir; one is stopped by the budget
    and still reports the evaluations it made."""
    from segtrain.checkpoint import load_pretrained

    data = _study_module().prepare_data(tmp_path / "data", 300_000, 1000, 0.15)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "kv_heads": 1, "seq_length": 256,
            "batch": 2, "tasks": "passkey", "text_fraction": 0.5}  # fmt: skip
    variants = [{"name": "done", **tiny, "steps": 4}, {"name": "stopped", **tiny, "steps": 10**6}]
    cmd = [sys.executable, os.fspath(ROOT / "tools/probe_retrieval.py"), "--data", os.fspath(data), "--out",
           os.fspath(tmp_path / "out"), "--device", "cpu", "--eval-every", "2", "--eval-samples", "2", "--budget-s", "30",
           "--save", "done", "--variants", json.dumps(variants)]  # fmt: skip
    run = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.fspath(ROOT)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "probe.json").read_text())["records"]
    done = [r["step"] for r in records if r["variant"] == "done"]
    stopped = [r["step"] for r in records if r["variant"] == "stopped"]
    assert done == [2, 4] and len(stopped) >= 2 and stopped == sorted(stopped)  # every 2 steps, then the final one
    assert all(0 <= r["passkey"][k] <= 1 for r in records for k in ("exact", "token_accuracy"))
    assert "| done | 4 |" in run.stdout and (tmp_path / "out" / "probe.png").is_file()
    model = load_pretrained(tmp_path / "out" / "done")
    assert model.config.hidden_size == 32 and model.config.vocab_size == 1000


def test_study_refuses_a_backend_that_cannot_train_here(tmp_path):
    done = subprocess.run(
        [sys.executable, os.fspath(ROOT / "tools/study_consistency.py"), "--smoke", "--backend", "flex",
         "--out", os.fspath(tmp_path / "out")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "--backend: 'flex' cannot train on cpu: it needs a CUDA GPU for its backward (torch FlexAttention has none on "
        "CPU); use auto or math"
    )


def test_study_places_arms_on_the_gpus_its_parent_sees(monkeypatch):
    study = _study_module()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert [study._env("cuda", slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["1", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert study._env("cuda", 1, 2)["CUDA_VISIBLE_DEVICES"] == "1"


def test_text_epochs_counts_how_often_each_arm_read_the_training_text():
    study = _study_module()
    s = dict(steps=100, micro_batch=8, seq_length=1000, synthetic_fraction=0.5, data={"tokens": {"train": 40_000}})
    assert study.text_epochs(s) == 10.0  # 100 x 8 x 1000 x 0.5 / 40,000
    stopped = {**s, "arms": {"A-s0": {"steps_done": 50}, "B-s0": {"steps_done": 20}}}
    assert study.text_epochs(stopped) == 5.0  # what the arms trained, not what was planned
    assert study.text_epochs({**s, "arms": {"A-s0": {"steps_done": 0}}}) == 0.0
    assert study.text_epochs({**s, "data": None}) == 0.0  # older results recorded no data: no note
