"""The megatron model under context parallelism on CPU (gloo, float64, 4 spawned processes): TP=2 x CP=2 and PP=2 x CP=2
give the logits, loss and every parameter gradient of the portable model on one device (which the megatron model equals:
tests/test_megatron.py), through the recipe's own step (CP shards, loss shares, megatron's 1F1B schedule; once more at
TP=2 x CP=2 with the recipe's own loss, megatron's vocab-parallel cross-entropy over gloo); each TP rank
exchanges its own KV heads only and each PP stage its own layers; the training loop with megatron CP=2 logs the losses
of CP=1 and its checkpoint converts to CP=1's weights. Two GPUs: tests/test_megatron_gpu.py."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from spawned import spawn_workers
from train_runs import ROOT, gpu_env, losses, torchrun, train, write_config

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from megatron_cases import CONFIG, FLOAT64, MICRO, check_gathered, make_inputs, near, run_layout, single_device  # noqa: E402

from segtrain.config import ModelConfig  # noqa: E402
from segtrain.models.llama import LlamaForCausalLM  # noqa: E402

LAYOUTS = {  # (tp, pp, cp), the split, history offload; the recipe's own loss or Float64Recipe's
    "tp2cp2": dict(tp=2, pp=1, cp=2, balance=False, offload=True),
    "pp2cp2": dict(tp=1, pp=2, cp=2, balance=True, offload=False),
    "tp2cp2-recipe-loss": dict(tp=2, pp=1, cp=2, balance=True, offload=False, recipe_loss=True),
}  # the cases' model and micro-batches: tests/megatron_cases.py


def _worker(rank, world, port, state, batches, layouts, device_type, dtype, out_dir):
    device = torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        results = {name: run_layout(state, batches, device, dtype, **layout) for name, layout in layouts.items()}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_layouts(layouts: dict, world: int, device_type: str, dtype: torch.dtype, tmp_path):
    """Every layout in one launch of ``world`` processes (megatron's import dominates the run time), and the float64
    single-device result."""
    config, model, batches = make_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = spawn_workers(_worker, world, (state, batches, layouts, device_type, dtype), tmp_path, timeout=240)
    return config, single_device(model, batches), results


def check_layout(spawned, layouts: dict, name: str, tol: dict, element_size: int) -> None:
    """Logits, loss and every parameter gradient of layout ``name`` against one device; CP bytes by formula."""
    from segtrain.parallel import exchange_bytes

    config, reference, results = spawned
    layout = layouts[name]
    runs = [r[name] for r in results]
    ranges = runs[0]["ranges"]
    if layout["balance"]:
        assert len({b - a for a, b in ranges}) > 1, f"the balanced split {ranges} is even: uneven shards go untested"
    check_gathered(runs, layout, config, reference, tol)
    # bytes on the wire: each TP rank's own KV heads and policies, each PP stage's own layers, per micro-batch
    n_local, table = config.num_kv_heads // layout["tp"], config.policy_table()
    per_stage = config.num_layers // layout["pp"]
    for r in runs:
        t, p, c = (r["coords"][k] for k in ("tp", "pp", "cp"))
        want = [0, 0, 0]
        for layer in range(p * per_stage, (p + 1) * per_stage):
            policy = table.shard(t, layout["tp"])[layer]
            f = exchange_bytes(ranges, config.segment_size, policy, batch=1, n_kv_heads=n_local, head_dim=config.head_dim,
                               element_size=element_size)[c]  # fmt: skip
            want = [w + MICRO * x for w, x in zip(want, (f.carry, f.history, f.carry_grad))]
        assert [r["stats"].carry, r["stats"].history, r["stats"].carry_grad] == want, (t, p, c)
    if layout["offload"]:
        assert sum(r["offloaded"] for r in runs) > 0


@pytest.fixture(scope="module")
def spawned_cpu(tmp_path_factory):
    return spawn_layouts(LAYOUTS, 4, "cpu", torch.float64, tmp_path_factory.mktemp("megatron_cp"))


# The recipe's own loss: megatron's cross-entropy runs in float32 (the logits stay float64), so the loss and the
# gradients that flow back from it carry float32 rounding: 4e-8 relative for both, measured on this CPU.
RECIPE_LOSS = {"logits": (1e-12, 0.0), "loss": 5e-7, "grads": 1e-6}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tp_pp_times_cp_equal_single_device(spawned_cpu, name):
    check_layout(spawned_cpu, LAYOUTS, name, RECIPE_LOSS if LAYOUTS[name].get("recipe_loss") else FLOAT64, element_size=8)


GPU_LAYOUTS = {  # two GPUs: CP=2 with TP = PP = 1
    "cp2": dict(tp=1, pp=1, cp=2, balance=False, offload=True),
    "cp2-balanced": dict(tp=1, pp=1, cp=2, balance=True, offload=False),
}
FLOAT32 = {"logits": 1e-5, "loss": 1e-5, "grads": 1e-4}  # relative norms against float64 (megatron's CE is float32)


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def spawned_gpu(tmp_path_factory):
    _two_gpus()
    return spawn_layouts(GPU_LAYOUTS, 2, "cuda", torch.float32, tmp_path_factory.mktemp("megatron_cp_gpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_cp2_over_nccl_equals_single_device(spawned_gpu, name):
    check_layout(spawned_gpu, GPU_LAYOUTS, name, FLOAT32, element_size=4)


def test_rope_runs_at_the_given_positions():
    """A CP shard's RoPE: the angles of its absolute positions, per row, never sliced by CP rank."""
    from segtrain.compat.megatron_core import segment_rotary_embedding
    from segtrain.models.llama import rope_cos_sin, rope_inv_freq

    config = ModelConfig(**CONFIG)
    rope = segment_rotary_embedding(rope_inv_freq(config), kv_channels=config.head_dim)
    positions = torch.stack([torch.arange(12, 20), torch.arange(3, 11)])
    rope.positions = positions
    emb = rope(8)
    assert emb.shape == (8, 2, 1, config.head_dim)
    cos, _ = rope_cos_sin(rope_inv_freq(config), positions, torch.float64)
    torch.testing.assert_close(emb.cos().double()[:, :, 0].transpose(0, 1), cos, rtol=0, atol=0)
    with pytest.raises(ValueError, match="position_ids cover 8 tokens, the decoder runs 9"):
        rope(9)
    rope.positions = None  # no position_ids given: offset..offset + T
    freqs = torch.arange(5, 9)[:, None].float() * rope.inv_freq
    assert torch.equal(rope(4, offset=5), torch.cat([freqs, freqs], -1)[:, None, None, :])


def test_shipped_8b_128k_config_runs_on_one_node_of_8_gpus(monkeypatch):
    """configs/train/llama3-8b-128k.yaml: its layout passes the megatron recipe's check on 8 ranks, every TP rank holds
    the same number of history-reading heads per layer, CP splits 128K by whole segments, and its comment's memory
    estimate (states + recompute inputs of the busiest CP rank) fits an 80 GB GPU."""
    from segtrain.parallel import balanced_ranges
    from segtrain.parallel.groups import make_layout
    from segtrain.train.config import load_train_config
    from segtrain.train.recipes import recipe_for

    monkeypatch.chdir(ROOT)
    cfg = load_train_config(ROOT / "configs/train/llama3-8b-128k.yaml", check_paths=False)
    p, m = cfg.parallel, cfg.model
    layout = make_layout(8, p.tp, p.pp, p.cp)
    assert (layout.dp, p.cp > 1, p.tp > 1) == (1, True, True)
    recipe_for(cfg).check(cfg, layout)
    for row in m.policy_table().layers:
        reading = [sum(q.reads_history for q in row[r * len(row) // p.tp : (r + 1) * len(row) // p.tp]) for r in range(p.tp)]
        assert len(set(reading)) == 1 and reading[0] > 0, reading
    ranges = balanced_ranges(m, cfg.data.seq_length, p.cp)
    busiest = max(b - a for a, b in ranges)
    with torch.device("meta"):
        params = sum(x.numel() for x in LlamaForCausalLM(m).parameters()) / (p.tp * p.pp)
    states = params * (2 + 2 + 16 / (layout.dp * p.cp))  # bf16 weights and gradients; fp32 master, Adam, grads sharded
    recompute_inputs = busiest * m.hidden_size * 2 * m.num_layers / p.pp
    assert states + recompute_inputs + 4e9 < 50e9, (states, recompute_inputs)


# ---- the training loop (torchrun) ----


def loop_cp_logs_the_cp1_losses(tmp_path, corpus, variants: dict, env=None, rel=2e-5) -> None:
    """Same samples and initial weights: each megatron CP variant (torchrun, one process per rank) logs the losses of
    megatron CP=1 (TP = PP = 1), sends CP traffic, and its checkpoint converts to the HF weights CP=1's converts to."""
    import json

    from safetensors.torch import load_file

    from segtrain.checkpoint import save_pretrained
    from segtrain.config import load_model_config
    from segtrain.convert import main as convert

    config = load_model_config("tiny", {"tie_word_embeddings": False, "attention_backend": "math"})
    torch.manual_seed(3)
    save_pretrained(LlamaForCausalLM(config), config, tmp_path / "init")
    model = {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "tie_word_embeddings": False, "attention_backend": "math"}
    init = ("--init-from", os.fspath(tmp_path / "init"))
    curves, norms, hf = {}, {}, {}
    for name, fields in {"cp1": {}, **variants}.items():
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name, corpus, model=model, model_impl="megatron", steps=3, save_every=3, grad_accum=2,
                           export_final=False, parallel__zero_stage=1, **fields)  # fmt: skip
        nproc = fields.get("parallel__tp", 1) * fields.get("parallel__pp", 1) * fields.get("parallel__cp", 1)
        if nproc == 1:
            run = train(cfg, *init, env=env, check=False)
            assert run.returncode == 0, run.stderr[-3000:]
        else:
            torchrun(cfg, nproc, *init, env=env)
        curves[name] = losses(tmp_path / name / "run")
        rows = [json.loads(line) for line in (tmp_path / name / "run/metrics.jsonl").read_text().splitlines()]
        norms[name] = {r["step"]: r["grad_norm"] for r in rows}
        out = tmp_path / f"hf_{name}"
        assert convert("to", [os.fspath(tmp_path / name / "run/checkpoints"), os.fspath(out), "--no-progress"]) == 0
        hf[name] = load_file(os.fspath(out / "model.safetensors"))
    print(curves)
    for name in variants:
        assert curves[name].keys() == curves["cp1"].keys() == {1, 2, 3}
        for step, value in curves["cp1"].items():
            assert curves[name][step] == pytest.approx(value, rel=rel), (name, step, curves)
            assert norms[name][step] == pytest.approx(norms["cp1"][step], rel=max(rel, 1e-4)), (name, step, norms)
        rows = [json.loads(line) for line in (tmp_path / name / "run/metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["cp_bytes_sent"] > 0, name
        if variants[name].get("parallel__offload_history"):
            assert rows[-1]["history_offloaded_bytes"] > 0, name
        assert sorted(hf[name]) == sorted(hf["cp1"])
        for key, value in hf["cp1"].items():  # per tensor: Adam's first step is the gradient's sign, rounding may flip one
            near(hf[name][key], value, 1e-3, f"{name} {key}")


@pytest.mark.slow
def test_loop_megatron_cp2_and_pp2_x_cp2_log_the_cp1_losses_and_convert(tmp_path, corpus):
    """CPU (gloo): CP=2 with the balanced split and history offload; PP=2 x CP=2 through megatron's 1F1B schedule and
    DeepSpeed (4 processes), whose checkpoint holds one file per pipeline stage."""
    variants = {
        "cp2": dict(parallel__cp=2, parallel__offload_history=True),
        "pp2cp2": dict(parallel__pp=2, parallel__cp=2),
    }
    loop_cp_logs_the_cp1_losses(tmp_path, corpus, variants)


@pytest.mark.gpu
def test_loop_megatron_cp2_over_nccl_logs_the_cp1_losses_and_converts(tmp_path, corpus):
    """Two GPUs (NCCL): the balanced split under megatron's full activation recompute (which reruns the CP exchange in
    backward), as the 8B config runs; history offload on GPUs is in test_cp2_over_nccl_equals_single_device."""
    _two_gpus()
    variants = {"cp2-recompute": dict(parallel__cp=2, megatron__activation__checkpointing=True)}
    loop_cp_logs_the_cp1_losses(tmp_path, corpus, variants, env=gpu_env(), rel=1e-4)
