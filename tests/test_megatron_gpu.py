"""The megatron model on GPUs: same logits, loss and gradients as the portable model (fp32 tight, bf16 loose);
TP=2 and PP=2 give TP=1's loss and gradients; the training loop at TP=2 and PP=2 logs the TP=1 losses; a 125M
model trains with the loss going down. Ranks run in spawned processes over NCCL (torchrun for the loop)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from spawned import free_port
from train_runs import gpu_env, losses, torchrun, write_config

pytestmark = pytest.mark.gpu

POLICIES = [["all", "none", "sink:4+window:100", "none"], ["none", "all", "none", "window:200"]] * 2
CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    segment_size=128,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_backend="auto",
    history_policy=POLICIES,
)
T, B = 640, 2  # 5 segments


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")


def _reference(dtype):
    """Portable model with random weights (norms too), inputs, and its loss, logits and gradients (HF names)."""
    from segtrain.config import ModelConfig
    from segtrain.models.llama import LlamaForCausalLM

    config = ModelConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to("cuda", dtype)
    ids = torch.randint(0, config.vocab_size, (B, T), device="cuda")
    labels = torch.randint(0, config.vocab_size, (B, T), device="cuda")
    logits = model(ids).float()
    loss = model(ids, labels=labels)
    loss.backward()
    grads = {k: p.grad.float().cpu() for k, p in model.named_parameters()}
    return config, state, ids.cpu(), labels.cpu(), dict(loss=loss.item(), logits=logits.cpu(), grads=grads)


def _worker(rank, world, port, tp, pp, dtype, state, ids, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    import torch.distributed as dist

    dist.init_process_group("nccl")
    from megatron.core import parallel_state as ps

    from segtrain.config import ModelConfig
    from segtrain.models.megatron import build_gpt_model, init_model_parallel
    from segtrain.models.megatron_adapter import hf_to_megatron

    config = ModelConfig(**CONFIG)
    init_model_parallel(tp, pp)
    key = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    model = build_gpt_model(config, tp=tp, pp=pp, dtype=dtype).cuda()
    missing, unexpected = model.load_state_dict(hf_to_megatron(state, config, tp, pp)[key], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    ids, labels = ids.cuda(), labels.cuda()
    positions = torch.arange(T, device="cuda")[None].expand(B, -1)
    result = {}
    if pp == 1:
        with torch.no_grad():
            result["logits"] = model(ids, positions, None, runtime_gather_output=True).float().cpu()
        loss = model(ids, positions, None, labels=labels).float().mean()
        loss.backward()
        result["loss"] = loss.item()
    else:  # megatron's 1F1B schedule over two micro-batches of one sequence each
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator, m):
            x, y = next(data_iterator)
            out = m(x, positions[:1], None, labels=y)
            return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

        batches = iter([(ids[i : i + 1], labels[i : i + 1]) for i in range(B)])
        res = get_forward_backward_func()(
            forward_step_func=step, data_iterator=batches, model=[model], num_microbatches=B, seq_length=T, micro_batch_size=1
        )
        if ps.is_pipeline_last_stage():
            result["loss"] = sum(r["loss"].item() for r in res) / B
    result["grads"] = {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.grad is not None}
    if ps.get_data_parallel_rank() == 0:
        torch.save((key, result), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path, world, tp, pp, dtype, state, ids, labels):
    mp.spawn(_worker, args=(world, free_port(), tp, pp, dtype, state, ids, labels, str(tmp_path)), nprocs=world, join=True)
    return dict(torch.load(tmp_path / f"rank{r}.pt") for r in range(world))


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads_hf(results, config, tp, pp):
    from segtrain.models.megatron_adapter import megatron_to_hf

    return megatron_to_hf({k: r["grads"] for k, r in results.items()}, config, tp, pp)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_megatron_equals_portable(tmp_path, dtype, tol):
    config, state, ids, labels, ref = _reference(dtype)
    results = _run(tmp_path, 1, 1, 1, dtype, state, ids, labels)
    r = results[(0, 0)]
    assert _rel(r["logits"], ref["logits"]) < tol
    assert abs(r["loss"] - ref["loss"]) < tol * ref["loss"]
    grads = _grads_hf(results, config, 1, 1)
    # Looser than the float64 CPU twin (test_megatron.py, 1e-10): in bf16 (8 significant bits) both models round, each
    # in its own order and fusions. On a CPU this model in bf16 against float64 moved the logits by 1.7e-2 and the q/k
    # projection gradients by 2.9e-2 (the softmax backward amplifies rounding of the scores); two such errors: 5x tol.
    for name, g in grads.items():
        assert _rel(g, ref["grads"][name]) < 5 * tol, name


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_equal_tp1(tmp_path, tp, pp):
    _two_gpus()
    config, state, ids, labels, ref = _reference(torch.float32)
    results = _run(tmp_path, tp * pp, tp, pp, torch.float32, state, ids, labels)
    last = results[(0, pp - 1)]
    assert abs(last["loss"] - ref["loss"]) < 2e-5 * ref["loss"], (last["loss"], ref["loss"])
    if tp > 1:
        assert _rel(results[(0, 0)]["logits"], ref["logits"]) < 2e-5
    grads = _grads_hf(results, config, tp, pp)
    for name, g in grads.items():
        assert _rel(g, ref["grads"][name]) < 1e-4, name


# ---- the training loop (torchrun) ----


def _init_checkpoint(tmp_path):
    from segtrain.checkpoint import save_pretrained
    from segtrain.config import load_model_config
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny", {"tie_word_embeddings": False})
    torch.manual_seed(5)
    save_pretrained(LlamaForCausalLM(config), config, tmp_path / "init")
    return tmp_path / "init"


@pytest.mark.parametrize(
    "parallel",
    [{"tp": 2, "zero_stage": 1}, {"tp": 2, "zero_stage": 2}, {"pp": 2, "zero_stage": 1}],
    ids=["tp2-zero1", "tp2-zero2", "pp2-zero1"],
)
def test_loop_tp2_pp2_log_the_tp1_losses(tmp_path, corpus, parallel):  # noqa: F811
    _two_gpus()
    init = _init_checkpoint(tmp_path)
    model = {"from": "configs/model/tiny.yaml", "tie_word_embeddings": False}
    runs = {}
    for name, par, nproc in (("tp1", {"zero_stage": parallel["zero_stage"]}, 1), ("mp", parallel, 2)):
        (tmp_path / name).mkdir()
        fields = {f"parallel__{k}": v for k, v in par.items()}
        cfg = write_config(tmp_path / name, corpus, model=model, model_impl="megatron", steps=6, grad_accum=2, **fields)
        torchrun(cfg, nproc, "--init-from", os.fspath(init), env=gpu_env())
        runs[name] = losses(tmp_path / name / "run")
    print(parallel, runs)
    assert list(runs["mp"]) == list(runs["tp1"]) == [1, 2, 3, 4, 5, 6]
    for step, loss in runs["tp1"].items():
        assert runs["mp"][step] == pytest.approx(loss, rel=1e-3), (step, runs)
    # issue 9: the TP=2 / PP=2 training checkpoint converts to the HF weights of the TP=1 one
    from safetensors.torch import load_file

    from segtrain.convert import main as convert

    hf = {}
    for name in runs:
        out = tmp_path / f"hf_{name}"
        assert convert("to", [os.fspath(tmp_path / name / "run" / "checkpoints"), os.fspath(out), "--no-progress"]) == 0
        hf[name] = load_file(os.fspath(out / "model.safetensors"))
    assert sorted(hf["mp"]) == sorted(hf["tp1"])
    for key, value in hf["tp1"].items():
        torch.testing.assert_close(hf["mp"][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_125m_trains_with_loss_going_down(tmp_path, corpus):  # noqa: F811
    steps = int(os.environ.get("SEGTRAIN_125M_STEPS", "300"))
    cfg = write_config(tmp_path, corpus, model={"from": "configs/model/125m.yaml", "segment_size": 512}, model_impl="megatron",
                       steps=steps, log_every=10, save_every=steps, micro_batch_size=4, data__seq_length=2048,
                       optim={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 30, "weight_decay": 0.0},
                       parallel__precision="bf16", parallel__zero_stage=1)  # fmt: skip
    torchrun(cfg, 1, env=gpu_env())
    curve = losses(tmp_path / "run")
    print({k: round(v, 3) for k, v in curve.items()})
    first, last = curve[10], curve[steps]
    assert last < first - 2.0, curve
