"""The megatron model under context parallelism on CPU (gloo, float64, 4 spawned processes): TP=2 x CP=2 and PP=2 x CP=2
give the logits, loss and every parameter gradient of the portable model on one device (which the megatron model equals:
tests/test_megatron.py), through the recipe's own step (CP shards, loss shares, megatron's 1F1B schedule); each TP rank
exchanges its own KV heads only and each PP stage its own layers; the training loop with megatron CP=2 logs the losses
of CP=1 and its checkpoint converts to CP=1's weights. Two GPUs: tests/test_megatron_gpu.py."""

import dataclasses
import datetime
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawned import spawn_workers
from test_train import ROOT, losses, torchrun, train, write_config

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from segtrain.config import ModelConfig  # noqa: E402
from segtrain.models.llama import LlamaForCausalLM  # noqa: E402
from segtrain.train.recipes.megatron import MegatronRecipe  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, segment_size=4,
              attention_backend="math", history_policy=[["all", "sink:2+window:3"], ["none", "window:5"]], rope_theta=100.0,
              tie_word_embeddings=False)  # fmt: skip
T, MICRO = 30, 2  # 8 segments, the last one partial; two micro-batches of one sequence
LAYOUTS = {  # (tp, pp, cp), the split, history offload
    "tp2cp2": dict(tp=2, pp=1, cp=2, balance=False, offload=True),
    "pp2cp2": dict(tp=1, pp=2, cp=2, balance=True, offload=False),
}


class Float64Recipe(MegatronRecipe):
    """The megatron recipe with a float64 cross-entropy over gathered logits: megatron's vocab-parallel cross-entropy
    runs in float32, which would hide float64 exactness of the parallel step behind float32 rounding."""

    def per_token_loss(self, engine, batch):
        from megatron.core import parallel_state as ps

        out = engine(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        if not ps.is_pipeline_last_stage():
            return out  # a stage's hidden states, sent on by the schedule
        return F.cross_entropy(out.transpose(1, 2), batch["labels"].clamp(min=0), reduction="none")


def make_inputs():
    """The portable model's float64 weights (norms random too) and the micro-batches (labels partly ignored, a loss mask)."""
    config = ModelConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(1)
    batches = []
    for m in range(MICRO):
        tokens = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels[:, :5] = -100
        batch = {"tokens": tokens, "labels": labels}
        if m == 1:
            batch["loss_mask"] = (torch.rand(1, T, generator=g) > 0.3).long()
        batches.append(batch)
    return config, model, batches


def single_device(model, batches):
    """Logits, the mean of the micro-batch losses and its gradients (HF names) on one device."""
    loss = sum(model(b["tokens"], labels=b["labels"], loss_mask=b.get("loss_mask")) for b in batches) / len(batches)
    loss.backward()
    with torch.no_grad():
        logits = torch.cat([model(b["tokens"]) for b in batches])
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _logits(model, recipe, batches):
    """This rank's logits of its shard of every micro-batch (last PP stage; None elsewhere), stage by stage."""
    from megatron.core import parallel_state as ps

    pp_group, out = ps.get_pipeline_model_parallel_group(), []
    with torch.no_grad():
        for batch in batches:
            shard = recipe.shard(batch)
            if not ps.is_pipeline_first_stage():
                hidden = torch.empty(shard["tokens"].shape[1], 1, CONFIG["hidden_size"], dtype=torch.float64)
                dist.recv(hidden, group=pp_group, group_src=0)
                model.set_input_tensor(hidden)
            y = model(shard["tokens"], shard["position_ids"], None, runtime_gather_output=True)
            if not ps.is_pipeline_last_stage():
                dist.send(y.contiguous(), group=pp_group, group_dst=1)
            out.append(y)
    return torch.cat(out) if ps.is_pipeline_last_stage() else None


def run_layout(state, batches, tp, pp, cp, balance, offload):
    """One step's forward and backward through the recipe (micro-batch losses, or the 1F1B schedule under PP)."""
    from megatron.core import parallel_state as ps

    from segtrain.compat.megatron_core import cpu_collectives
    from segtrain.models.megatron import build_gpt_model, init_model_parallel
    from segtrain.models.megatron_adapter import hf_to_megatron
    from segtrain.parallel.groups import build_groups, make_layout

    config = ModelConfig(**CONFIG)
    init_model_parallel(tp, pp, cp)
    try:
        groups = build_groups(make_layout(dist.get_world_size(), tp, pp, cp))
        here = groups.coords
        model = build_gpt_model(config, tp=tp, pp=pp, dtype=torch.float64, use_cpu_initialization=True)
        missing, unexpected = model.load_state_dict(hf_to_megatron(state, config, tp, pp)[(here["tp"], here["pp"])], strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        recipe = Float64Recipe()
        parallel = SimpleNamespace(cp_balance=balance, cp_balance_cap=None, offload_history=offload)
        cfg = SimpleNamespace(model=config, data=SimpleNamespace(seq_length=T), parallel=parallel)
        recipe.apply_context_parallel(model, cfg, groups)
        with cpu_collectives():  # megatron's TP gather of the logits
            if pp == 1:
                loss = sum(recipe.micro_loss(model, b) for b in batches) / len(batches)
                loss.backward()
                loss = loss.detach().double()
            else:
                loss = recipe.pipeline_forward_backward(model, batches) / len(batches)
            sent = dataclasses.replace(recipe.cp.stats)  # one step; the logits pass below sends again
            offloaded = recipe.cp.offload.settle().offloaded if offload else 0
            logits = _logits(model, recipe, batches)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return dict(coords=here, ranges=recipe.cp.ranges, loss=loss, logits=logits, grads=grads, stats=sent, offloaded=offloaded)
    finally:
        ps.destroy_model_parallel()


def _worker(rank, world, port, state, batches, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = {name: run_layout(state, batches, **layout) for name, layout in LAYOUTS.items()}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Both layouts in one launch of 4 processes (megatron's import dominates the run time); the single-device result."""
    config, model, batches = make_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = spawn_workers(_worker, 4, (state, batches), tmp_path_factory.mktemp("megatron_cp"), timeout=240)
    return config, batches, single_device(model, batches), results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tp_pp_times_cp_equal_single_device(spawned, name):
    from segtrain.models.megatron_adapter import megatron_to_hf
    from segtrain.parallel import exchange_bytes

    config, batches, (logits, loss, grads), results = spawned
    layout = LAYOUTS[name]
    runs = [r[name] for r in results]
    by = {(r["coords"]["tp"], r["coords"]["pp"], r["coords"]["cp"]): r for r in runs}
    cp, last = layout["cp"], layout["pp"] - 1
    ranges = runs[0]["ranges"]
    if layout["balance"]:
        assert len({b - a for a, b in ranges}) > 1, f"the balanced split {ranges} is even: uneven PP shapes go untested"
    for t in range(layout["tp"]):
        got = torch.cat([by[(t, last, c)]["logits"] for c in range(cp)], 1)  # shards side by side along the sequence
        torch.testing.assert_close(got, logits, atol=1e-12, rtol=0)
        # each CP rank backpropagates CP x its share (gradients are averaged over DP x CP): the shares sum to the loss
        torch.testing.assert_close(sum(by[(t, last, c)]["loss"] for c in range(cp)) / cp, loss, atol=1e-12, rtol=0)
    shards = {(t, p): {k: sum(by[(t, p, c)]["grads"][k] for c in range(cp)) / cp for k in by[(t, p, 0)]["grads"]}
              for t in range(layout["tp"]) for p in range(layout["pp"])}  # fmt: skip
    got = megatron_to_hf(shards, config, layout["tp"], layout["pp"])
    assert set(got) == set(grads)
    for k, want in grads.items():
        torch.testing.assert_close(got[k], want, atol=1e-12, rtol=1e-10, msg=k)
    # bytes on the wire: each TP rank's own KV heads and policies, each PP stage's own layers, per micro-batch
    n_local, table = config.num_kv_heads // layout["tp"], config.policy_table()
    per_stage = config.num_layers // layout["pp"]
    for (t, p, c), r in by.items():
        want = [0, 0, 0]
        for layer in range(p * per_stage, (p + 1) * per_stage):
            policy = table.shard(t, layout["tp"])[layer]
            f = exchange_bytes(ranges, config.segment_size, policy, batch=1, n_kv_heads=n_local, head_dim=config.head_dim,
                               element_size=8)[c]  # fmt: skip
            want = [w + MICRO * x for w, x in zip(want, (f.carry, f.history, f.carry_grad))]
        assert [r["stats"].carry, r["stats"].history, r["stats"].carry_grad] == want, (t, p, c)
    if layout["offload"]:
        assert sum(r["offloaded"] for r in runs) > 0


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


# ---- the training loop (torchrun) ----


@pytest.mark.slow
def test_loop_megatron_cp2_logs_the_cp1_losses_and_converts(tmp_path, corpus):
    """Same samples and initial weights: megatron CP=2 (balanced split, history offload) logs the losses of megatron CP=1,
    and both checkpoints convert to the same HF weights."""
    from safetensors.torch import load_file

    from segtrain.checkpoint import save_pretrained
    from segtrain.config import load_model_config
    from segtrain.convert import main as convert

    config = load_model_config("tiny", {"tie_word_embeddings": False, "attention_backend": "math"})
    torch.manual_seed(3)
    save_pretrained(LlamaForCausalLM(config), config, tmp_path / "init")
    model = {"from": os.fspath(ROOT / "configs/model/tiny.yaml"), "tie_word_embeddings": False, "attention_backend": "math"}
    runs = {}
    for name, fields in (("cp1", {}), ("cp2", dict(parallel__cp=2, parallel__offload_history=True))):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, corpus, model=model, model_impl="megatron", steps=3, save_every=3,
                                  export_final=False, **fields)  # fmt: skip
    init = ("--init-from", os.fspath(tmp_path / "init"))
    train(runs["cp1"], *init)
    torchrun(runs["cp2"], 2, *init)
    one, two = losses(tmp_path / "cp1/run"), losses(tmp_path / "cp2/run")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step, value in one.items():
        assert two[step] == pytest.approx(value, rel=2e-5), (step, one, two)
    hf = {}
    for name in runs:
        out = tmp_path / f"hf_{name}"
        assert convert("to", [os.fspath(tmp_path / name / "run/checkpoints"), os.fspath(out), "--no-progress"]) == 0
        hf[name] = load_file(os.fspath(out / "model.safetensors"))
    assert sorted(hf["cp2"]) == sorted(hf["cp1"])
    for key, value in hf["cp1"].items():
        torch.testing.assert_close(hf["cp2"][key], value, rtol=1e-3, atol=1e-5, msg=key)
