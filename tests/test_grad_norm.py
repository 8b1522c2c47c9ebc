"""``grad_norm`` in metrics.jsonl is the global gradient norm before clipping: equal to a float64 norm of the step's
gradient computed here, with clipping on (so the clipped norm would differ), under ZeRO 0-3, TP and PP."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawned import spawn_workers
from train_runs import ROOT, torchrun, train, write_config

from segtrain.parallel.groups import build_groups, make_layout
from segtrain.train.grad_norm import global_grad_norm

CLIP = 1e-3  # far below the norm: DeepSpeed clips every step


def _norm_worker(rank, world, port, grads, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for name, layout in (("tp2", make_layout(world, tp=2)), ("dp2", make_layout(world))):
        split = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
        split.tensor_model_parallel = True  # megatron's mark of a TP shard
        split.grad = grads["split"].chunk(2)[rank if name == "tp2" else 0].clone()  # under DP=2 a replica: the same half
        whole = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        whole.grad = grads["whole"].clone()
        unused = torch.nn.Parameter(torch.zeros(2))  # no gradient: skipped
        out[name] = global_grad_norm([split, whole, unused], build_groups(layout)).item()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_tp_shards_are_summed_and_replicas_counted_once(tmp_path):
    torch.manual_seed(0)
    grads = {"split": torch.randn(6, 4, dtype=torch.float64), "whole": torch.randn(5, dtype=torch.float64)}
    results = spawn_workers(_norm_worker, 2, (grads,), tmp_path, timeout=120)
    tp2 = float(torch.cat([grads["split"].flatten(), grads["whole"]]).norm())
    dp2 = float(torch.cat([grads["split"][:3].flatten(), grads["whole"]]).norm())
    for r in results:
        assert r["tp2"] == pytest.approx(tp2, rel=1e-6) and r["dp2"] == pytest.approx(dp2, rel=1e-6), (r, tp2, dp2)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """Fixed initial weights (portable format, untied embeddings: PP can run them too)."""
    from segtrain.checkpoint import save_pretrained
    from segtrain.config import load_model_config
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny", {"tie_word_embeddings": False, "attention_backend": "math"})
    torch.manual_seed(5)
    out = tmp_path_factory.mktemp("init")
    save_pretrained(LlamaForCausalLM(config), config, out)
    return out


def reference_first_step_norm(config_path, init) -> float:
    """The first step's gradient norm in float64: the same weights and samples, the mean of the micro-batch losses."""
    from segtrain.checkpoint import load_pretrained
    from segtrain.train.config import load_train_config
    from segtrain.train.data import build_train_dataset

    cfg = load_train_config(config_path)
    dataset = build_train_dataset(cfg, num_samples=cfg.steps * cfg.micro_batch_size * cfg.grad_accum)  # as the loop does
    model = load_pretrained(init, dtype=torch.float64)
    mb = cfg.micro_batch_size
    for m in range(cfg.grad_accum):
        samples = [dataset[i] for i in range(m * mb, (m + 1) * mb)]
        batch = {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in samples[0]}
        loss = model(batch["tokens"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                     position_ids=batch.get("position_ids"))  # fmt: skip
        (loss / cfg.grad_accum).backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))


def logged_norms(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows}


MODEL = {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "tie_word_embeddings": False, "attention_backend": "math"}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_logged_norm_is_the_unclipped_norm_of_the_steps_gradient(tmp_path, corpus, init_dir, zero_stage):
    config = write_config(tmp_path, corpus, model=MODEL, steps=2, save_every=2, micro_batch_size=1, grad_accum=2,
                          export_final=False, optim__grad_clip=CLIP, parallel__zero_stage=zero_stage)  # fmt: skip
    train(config, "--init-from", os.fspath(init_dir))
    norms = logged_norms(tmp_path / "run")
    expected = reference_first_step_norm(config, init_dir)
    assert expected > 100 * CLIP
    assert norms[1] == pytest.approx(expected, rel=1e-5), (norms, expected)
    assert norms[2] is not None and norms[2] > 100 * CLIP


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tp": 2, "zero_stage": 0}, {"pp": 2, "zero_stage": 1}], ids=["tp2-zero0", "pp2-zero1"])
def test_megatron_tp_and_pp_log_the_whole_models_norm(tmp_path, corpus, init_dir, parallel):
    """Each rank holds a TP shard or a PP stage: the logged norm is still the whole model's, replicated parameters
    (norms, biases) counted once. ZeRO-0 is measured by segtrain, ZeRO-1 by DeepSpeed's optimizer."""
    fields = {f"parallel__{k}": v for k, v in parallel.items()}
    config = write_config(tmp_path, corpus, model=MODEL, model_impl="megatron", steps=1, save_every=1, micro_batch_size=1,
                          grad_accum=2, export_final=False, optim__grad_clip=CLIP, **fields)  # fmt: skip
    torchrun(config, 2, "--init-from", os.fspath(init_dir))
    expected = reference_first_step_norm(config, init_dir)
    assert logged_norms(tmp_path / "run")[1] == pytest.approx(expected, rel=1e-4)
