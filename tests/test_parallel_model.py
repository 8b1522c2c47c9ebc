"""The Llama model under context parallelism (gloo, spawned processes) equals CP=1: logits, loss, parameter
gradients; bytes on the wire match the formula; history offload on/off gives identical gradients."""

import dataclasses
import datetime
import os
import random

import pytest
import torch
import torch.distributed as dist
from spawned import spawn_workers

from segtrain.config import ModelConfig
from segtrain.loss import shard_share
from segtrain.models.llama import LlamaForCausalLM
from segtrain.parallel import (
    ExchangeBytes,
    HistoryOffload,
    apply_context_parallel,
    balanced_ranges,
    context_parallel_ranges,
    exchange_bytes,
    shard_batch,
    shard_ranges,
)

POLICIES = ["none", "all", "sink:3", "window:5", "sink:2+window:6", "window:11"]


def random_case(seed: int, world: int) -> dict:
    rng = random.Random(seed)
    S = rng.choice([3, 4, 5])
    n_segments = rng.randint(world + 1, 3 * world)
    T = n_segments * S - rng.choice([0, 0, 1, S - 1])  # sometimes a partial last segment
    layers = [[rng.choice(POLICIES) for _ in range(2)] for _ in range(2)]
    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        segment_size=S,
        history_policy=layers,
        attention_backend="math",
        max_position_embeddings=512,
        rope_theta=100.0,
        initializer_range=0.2,
    )
    split = rng.choice(["even", "balanced", "random"])
    config = ModelConfig(**cfg)
    if split == "even":
        ranges = context_parallel_ranges(T, S, world)
    elif split == "balanced":
        ranges = balanced_ranges(config, T, world)
    else:
        cuts = sorted(rng.sample(range(1, n_segments), world - 1))
        lengths = [(b - a) * S for a, b in zip([0, *cuts], cuts)]
        ranges = shard_ranges([*lengths, T - sum(lengths)], S)
    return dict(seed=seed, cfg=cfg, T=T, B=rng.choice([1, 2]), ranges=ranges, masked=rng.random() < 0.5)


def make_model(c) -> LlamaForCausalLM:
    torch.manual_seed(c["seed"])
    return LlamaForCausalLM(ModelConfig(**c["cfg"]), loss_chunk_size=7).double()


def make_batch(c) -> dict:
    g = torch.Generator().manual_seed(c["seed"] + 1)
    tokens = torch.randint(0, 97, (c["B"], c["T"]), generator=g)
    labels = torch.randint(0, 97, (c["B"], c["T"]), generator=g)
    batch = {"tokens": tokens, "labels": labels}
    if c["masked"]:
        labels[:, : c["T"] // 3] = -100
        batch["loss_mask"] = (torch.rand(c["B"], c["T"], generator=g) > 0.3).long()
    return batch


def single_device(c):
    model, batch = make_model(c), make_batch(c)
    loss = model(batch["tokens"], labels=batch["labels"], loss_mask=batch.get("loss_mask"))
    loss.backward()
    logits = model(batch["tokens"]).detach()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def run_rank(c, group, offload: bool):
    rank = dist.get_rank(group)
    model, stats = make_model(c), ExchangeBytes()
    off = HistoryOffload() if offload else None
    apply_context_parallel(model, group, c["ranges"], stats=stats, offload=off)
    shard = shard_batch(make_batch(c), c["ranges"], rank)
    local = model(shard["tokens"], labels=shard["labels"], position_ids=shard["position_ids"], reduction="none")
    loss = shard_share(local, shard["labels"], shard.get("loss_mask"), group)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    sent = dataclasses.replace(stats)  # one forward and backward; the logits pass below sends again
    with torch.no_grad():
        logits = model(shard["tokens"], position_ids=shard["position_ids"])
    return dict(loss=loss.detach(), logits=logits, grads=grads, stats=sent, offload=off.stats if off else None)


def _worker(rank, world, port, cases, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = [(run_rank(c, dist.group.WORLD, False), run_rank(c, dist.group.WORLD, True)) for c in cases]
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world, cases, tmp_path, timeout=120):
    return spawn_workers(_worker, world, (cases,), tmp_path, timeout)


def check(cases, results, world):
    history_bytes = offloaded = 0
    for i, c in enumerate(cases):
        logits, loss, grads = single_device(c)
        for which in (0, 1):  # offload off, on
            shards = [results[r][i][which] for r in range(world)]
            torch.testing.assert_close(torch.cat([s["logits"] for s in shards], 1), logits, atol=1e-12, rtol=0)
            torch.testing.assert_close(sum(s["loss"] for s in shards), loss, atol=1e-12, rtol=0)
            for name, want in grads.items():
                got = sum(s["grads"][name] for s in shards)  # what a reduction over the CP group gives
                torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m, n=name, c=c: f"{n} case {c}: {m}")
        for r in range(world):  # offload changes no bit of the gradients
            off, on = results[r][i]
            assert all(torch.equal(off["grads"][n], on["grads"][n]) for n in grads)
            assert on["offload"].prefetched == on["offload"].offloaded and on["offload"].waited == 0
            offloaded += on["offload"].offloaded
        cfg = ModelConfig(**c["cfg"])
        want = [ExchangeBytes() for _ in range(world)]
        for row in cfg.policy_table().layers:  # per layer, forward + backward
            per_layer = exchange_bytes(c["ranges"], cfg.segment_size, row, batch=c["B"], n_kv_heads=2, head_dim=8, element_size=8)
            for w, f in zip(want, per_layer):
                w.carry, w.history, w.carry_grad = w.carry + f.carry, w.history + f.history, w.carry_grad + f.carry_grad
        assert [results[r][i][0]["stats"] for r in range(world)] == want
        history_bytes += sum(w.history for w in want)
    assert history_bytes > 0 and offloaded > 0, "no case exchanged or offloaded history: the checks are vacuous"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_cp_model_equals_single_device(tmp_path, world):
    cases = [random_case(100 * world + i, world) for i in range(5 if world == 2 else 3)]
    check(cases, spawn(world, cases, tmp_path), world)


@pytest.mark.slow
def test_none_heads_exchange_no_history(tmp_path):
    c = random_case(11, 2)
    c["cfg"]["history_policy"] = "none"
    results = spawn(2, [c], tmp_path)
    check_stats = [results[r][0][0]["stats"] for r in range(2)]
    assert [s.history for s in check_stats] == [0, 0] and check_stats[0].carry > 0
    assert all(results[r][0][1]["offload"].offloaded == 0 for r in range(2))


def test_apply_context_parallel_rejects_a_non_segtrain_model():
    with pytest.raises(TypeError, match="no attention slot"):
        apply_context_parallel(torch.nn.Linear(2, 2), None, [(0, 4)])
