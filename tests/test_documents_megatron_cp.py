"""Document mode in the megatron model under TP x CP and PP x CP (gloo, 4 spawned CPU processes, float64), with history
offload: logits, loss and every gradient equal the portable model in document mode on one device, which
tests/test_documents.py proves equal to each document run alone. The machinery is tests/test_megatron_cp.py's, in
tests/megatron_cases.py."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from spawned import spawn_workers

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from megatron_cases import CONFIG, FLOAT64, check_gathered, make_inputs, run_layout  # noqa: E402

from segtrain.config import ModelConfig  # noqa: E402

LAYOUTS = {
    "tp2cp2-offload": dict(tp=2, pp=1, cp=2, balance=False, offload=True),
    "pp2cp2-balanced": dict(tp=1, pp=2, cp=2, balance=True, offload=False),
}
DOCUMENTS = [[7, 13, 2, 8], [3, 27]]  # per micro-batch: documents across the CP boundary, shorter than a segment


def _packed(batches):
    for batch, lengths in zip(batches, DOCUMENTS):
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    return batches


def _worker(rank, world, port, state, batches, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        device = torch.device("cpu")
        results = {
            name: run_layout(state, batches, device, torch.float64, **lay, documents=True) for name, lay in LAYOUTS.items()
        }
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    _, model, batches = make_inputs()
    config = ModelConfig(**{**CONFIG, "documents": True})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _packed(batches)
    results = spawn_workers(_worker, 4, (state, batches), tmp_path_factory.mktemp("documents_cp"), timeout=300)
    from segtrain.models.llama import LlamaForCausalLM

    ref = LlamaForCausalLM(config).double()
    ref.load_state_dict(state)
    kw = [dict(labels=b["labels"], loss_mask=b.get("loss_mask"), position_ids=b["position_ids"]) for b in batches]
    loss = sum(ref(b["tokens"], **k) for b, k in zip(batches, kw)) / len(batches)
    loss.backward()
    with torch.no_grad():
        logits = torch.cat([ref(b["tokens"], position_ids=b["position_ids"]) for b in batches])
        one_stream = torch.cat([ref(b["tokens"]) for b in batches])
    assert (one_stream - logits).abs().max() > 1e-3  # the layouts do change the result
    return config, (logits, loss.detach(), {n: p.grad for n, p in ref.named_parameters()}), results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_tp_pp_times_cp_in_document_mode_equal_single_device(spawned, name):
    config, reference, results = spawned
    layout, runs = LAYOUTS[name], [r[name] for r in results]
    check_gathered(runs, layout, config, reference, FLOAT64)
    if layout["offload"]:
        assert sum(r["offloaded"] for r in runs) > 0
