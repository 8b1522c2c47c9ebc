"""The training loss against a per-sample float64 computation written out here, position by position.

The other loss tests compare two paths through :func:`segtrain.loss.token_weights` (``mean_loss`` and ``loss_weights``),
so a wrong weight is on both sides. Here each sample's weighted cross-entropy is summed in Python floats from the
logits, the labels and the mask (fractional, with ignored labels), and the loss is checked as the token mean (the
default), the mean of per-sample means (``data.loss_average: sample``) and summed over context-parallel shards.
"""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from spawned import spawn_workers
from tiny_models import make_model, tiny_config

from segtrain.loss import IGNORE_INDEX, loss_weights, mean_loss, shard_share
from segtrain.train.data import PerSampleMean

B, T = 3, 29


def per_sample_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, float]]:
    """``(sum of mask x cross-entropy, sum of mask)`` of each sample over its counted positions, in Python floats."""
    sums = []
    for b in range(labels.shape[0]):
        loss = weight = 0.0
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE_INDEX:
                continue
            row = [float(x) for x in logits[b, t]]
            top = max(row)
            cross_entropy = top + math.log(sum(math.exp(x - top) for x in row)) - row[label]
            loss += float(mask[b, t]) * cross_entropy
            weight += float(mask[b, t])
        sums.append((loss, weight))
    return sums


def token_mean(sums) -> float:
    return sum(loss for loss, _ in sums) / sum(weight for _, weight in sums)


def sample_mean(sums) -> float:
    means = [loss / weight for loss, weight in sums if weight > 0]
    return sum(means) / len(means)


def differentiable_token_mean(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same token mean with autograd, position by position (for the gradients)."""
    terms, total = [], 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if int(labels[b, t]) != IGNORE_INDEX:
                row = logits[b, t].double()
                terms.append(float(mask[b, t]) * (torch.logsumexp(row, 0) - row[int(labels[b, t])]))
                total += float(mask[b, t])
    return torch.stack(terms).sum() / total


def batch(seed: int = 0):
    """Token ids, labels with ignored positions (a whole sample ignored but one position), a fractional mask in (0, 1]
    with some exact zeros: binarising it, or counting ignored labels, changes the loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (B, T), generator=g)
    labels = torch.randint(0, 101, (B, T), generator=g)
    labels[0, :6] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX  # one counted position: its sample mean is that position's loss
    mask = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.9 + 0.1
    mask[1, ::4] = 0.0
    return ids, labels, mask


@pytest.fixture(scope="module")
def model():
    m = make_model(tiny_config(segment_size=6), dtype=torch.float64).train()
    m.loss_chunk_size = 7  # several chunks, the last short
    return m


def test_model_loss_is_the_weighted_token_mean_with_its_gradients(model):
    ids, labels, mask = batch()
    logits = model(ids)
    sums = per_sample_sums(logits.detach(), labels, mask)
    want_grads = torch.autograd.grad(differentiable_token_mean(logits, labels, mask), list(model.parameters()))
    for name, loss in [
        ("mean_loss", model(ids, labels=labels, loss_mask=mask)),
        ("loss_weights", model(ids, labels=labels, loss_weights=loss_weights(labels, mask))),  # the fused loss
    ]:
        assert loss.dtype == torch.float64
        assert math.isclose(float(loss.detach()), token_mean(sums), rel_tol=1e-12), name
        for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), want_grads):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=lambda m, name=name: f"{name}: {m}")
    binary = per_sample_sums(logits.detach(), labels, (mask > 0).double())
    assert abs(token_mean(binary) - token_mean(sums)) > 1e-3  # the check can tell a binarised mask


def test_per_sample_weights_give_the_mean_of_sample_means(model):
    ids, labels, mask = batch(1)
    rows = PerSampleMean([{"tokens": ids[b], "labels": labels[b], "loss_mask": mask[b]} for b in range(B)])
    weights = torch.stack([rows[b]["loss_mask"] for b in range(B)])
    with torch.no_grad():
        sums = per_sample_sums(model(ids), labels, mask)
        got = float(model(ids, labels=labels, loss_mask=weights))
    assert math.isclose(got, sample_mean(sums), rel_tol=1e-12)
    assert abs(sample_mean(sums) - token_mean(sums)) > 1e-2  # the two averages differ on this batch


def _shard_worker(rank, world, port, per_token, labels, mask, cuts, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        lo, hi = cuts[rank], cuts[rank + 1]
        x, y, m = per_token[:, lo:hi], labels[:, lo:hi], mask[:, lo:hi]
        share = shard_share(x, y, m, dist.group.WORLD, scale=3.0)
        weighted = (x * loss_weights(y, m, dist.group.WORLD, scale=3.0)).sum()
        torch.save((share, weighted), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_shares_sum_to_the_token_mean(tmp_path):
    """Uneven shards over gloo: each rank's ``shard_share`` and ``loss_weights`` sum to ``scale x`` the token mean."""
    _, labels, mask = batch(2)
    per_token = torch.rand(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4 + 0.5
    want = 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if int(labels[b, t]) != IGNORE_INDEX:
                want = want[0] + float(mask[b, t]) * float(per_token[b, t]), want[1] + float(mask[b, t])
    shards = spawn_workers(_shard_worker, 2, (per_token, labels, mask, [0, 12, T]), tmp_path, timeout=60)
    for i, name in enumerate(("shard_share", "loss_weights")):
        assert math.isclose(sum(float(s[i]) for s in shards), 3.0 * want[0] / want[1], rel_tol=1e-12), name
    assert math.isclose(float(mean_loss(per_token, labels, mask)), want[0] / want[1], rel_tol=1e-12)
