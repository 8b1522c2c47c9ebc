"""Document mode in the training loop (CPU, gloo, torchrun): the portable recipe with packed indexed data logs the same
losses with CP=2 (history offload on) as with CP=1, and not those of one stream."""

import json

import numpy as np
import pytest
from train_runs import losses, torchrun, train, write_config


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_document_mode_cp2_logs_the_losses_of_cp1(tmp_path, corpus):
    runs = {}
    variants = {
        "stream": {},
        "cp1": dict(model__documents=True),
        "cp2": dict(model__documents=True, parallel__cp=2, parallel__offload_history=True),
    }
    for name, fields in variants.items():
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, corpus, steps=3, save_every=3, export_final=False, **fields)
    train(runs["stream"])
    train(runs["cp1"])
    torchrun(runs["cp2"], 2)
    one, two, stream = (losses(tmp_path / name / "run") for name in ("cp1", "cp2", "stream"))
    assert one.keys() == two.keys() == set(range(1, 4))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)
    norm_one, norm_two = grad_norms(tmp_path / "cp1/run"), grad_norms(tmp_path / "cp2/run")
    np.testing.assert_allclose([norm_two[s] for s in norm_one], [norm_one[s] for s in norm_one], rtol=1e-4)
    assert abs(stream[1] - one[1]) > 1e-4  # document mode changes the loss (masks and attention)
