"""Context parallelism in the training loop (CPU, gloo, torchrun): CP=2 logs the losses CP=1 does, with the
balanced uneven split and history offload; process groups follow megatron-core's rank order; CP configs
that cannot work stop naming the field."""

import json
import os

import numpy as np
import pytest
from train_runs import ROOT, gpu_env, losses, torchrun, train, write_config

from segtrain.config import ConfigError
from segtrain.parallel.groups import Layout, group_ranks, layout_coords
from segtrain.train.config import deepspeed_config, load_train_config


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_cp2_logs_the_losses_of_cp1(tmp_path, corpus):  # noqa: F811
    """Same samples, same initial weights: CP=2 (balanced uneven split, history offload on) and DP=2 x CP=2 (even
    split, the fused loss: each rank's weights divide by the positions counted over its CP group) equal CP=1 step by
    step."""
    runs = {}
    for name, fields in (("cp1", {}), ("cp2", dict(parallel__cp=2, parallel__offload_history=True))):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, corpus, steps=4, save_every=4, export_final=False, **fields)
    (tmp_path / "dp2cp2").mkdir()  # DP=2 x CP=2 with half the micro-batch sees the same samples per step
    runs["dp2cp2"] = write_config(
        tmp_path / "dp2cp2",
        corpus,
        steps=4,
        save_every=4,
        export_final=False,
        micro_batch_size=1,
        parallel__cp=2,
        parallel__cp_balance=False,
        portable__fused_loss=True,
    )
    train(runs["cp1"])
    torchrun(runs["cp2"], 2)
    torchrun(runs["dp2cp2"], 4)
    one, norm = losses(tmp_path / "cp1/run"), grad_norms(tmp_path / "cp1/run")
    assert one.keys() == set(range(1, 5))
    for name in ("cp2", "dp2cp2"):
        other = losses(tmp_path / name / "run")
        assert other.keys() == one.keys()
        np.testing.assert_allclose([other[s] for s in one], [one[s] for s in one], rtol=2e-5, err_msg=name)
        other = grad_norms(tmp_path / name / "run")  # the CP ranks' reduced gradients count once
        np.testing.assert_allclose([other[s] for s in norm], [norm[s] for s in norm], rtol=1e-4, err_msg=name)
    assert one[4] < one[1]  # it trains: not a loss that ignores the parameters
    rows = [json.loads(line) for line in (tmp_path / "cp2/run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["cp_bytes_sent"] > 0 and rows[-1]["history_offloaded_bytes"] > 0


def test_group_ranks_follow_megatron_order():
    from megatron.core.parallel_state import RankGenerator

    layout = Layout(tp=2, pp=2, cp=2, dp=2)
    gen = RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=2, order="tp-cp-ep-dp-pp")
    for dims, name in ((("tp",), "tp"), (("cp",), "cp"), (("dp",), "dp"), (("pp",), "pp"), (("dp", "cp"), "dp-cp")):
        assert group_ranks(layout, dims) == sorted(gen.get_ranks(name)), name
    assert layout_coords(13, layout) == {"tp": 1, "cp": 0, "dp": 1, "pp": 1}


def test_deepspeed_batch_counts_dp_times_cp(tmp_path, corpus):  # noqa: F811
    cfg = load_train_config(write_config(tmp_path, corpus, parallel__cp=2, parallel__offload_history=True))
    ds = deepspeed_config(cfg, 4)  # DP=2 x CP=2: DeepSpeed's data-parallel group has 4 ranks
    assert ds["train_batch_size"] == cfg.micro_batch_size * cfg.grad_accum * 4
    assert ds["offload_history"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(parallel__cp=5), "parallel.cp: 5 ranks cannot share 4 segments"),
        (dict(parallel__cp=0), "parallel.cp: must be a positive integer"),
        (dict(parallel__offload_history=True), "parallel.offload_history: .* set parallel.cp > 1"),
        (
            dict(parallel__cp=2, parallel__offload_history=True, portable__activation__checkpointing=True),
            "parallel.offload_history: with activation",
        ),
        (dict(parallel__cp=2, deepspeed={"offload_history": {"device": "cpu"}}), "deepspeed.offload_history.device: 'cpu'"),
        (dict(parallel__cp_balance="yes"), "parallel.cp_balance: expected true or false"),
        (dict(parallel__cp=2, parallel__cp_balance_cap=0.9), "parallel.cp_balance_cap: must be a number >= 1.0"),
        (dict(parallel__cp=2, parallel__cp_balance_cap="big"), "parallel.cp_balance_cap: expected float"),
        (dict(parallel__cp=2, parallel__cp_balance=False, parallel__cp_balance_cap=1.1), "parallel.cp_balance_cap: caps"),
    ],
)
def test_bad_cp_configs_name_the_field(tmp_path, corpus, fields, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        load_train_config(write_config(tmp_path, corpus, **fields))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="needs 2 CUDA GPUs")
def test_cp2_over_nccl_logs_the_losses_of_cp1(tmp_path, corpus):  # noqa: F811
    """The loop on GPUs: CP=2 over NCCL (DeepSpeed's CUDA accelerator) equals CP=1 on one GPU."""
    env = gpu_env()
    model = {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "attention_backend": "math"}
    runs = {}
    for name, fields in (("cp1", {}), ("cp2", dict(parallel__cp=2, parallel__offload_history=True))):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, corpus, steps=4, save_every=4, export_final=False, model=model, **fields)
    single = train(runs["cp1"], env=env, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun(runs["cp2"], 2, env=env)
    one, two = losses(tmp_path / "cp1/run"), losses(tmp_path / "cp2/run")
    assert one.keys() == two.keys() == set(range(1, 5))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-4)
