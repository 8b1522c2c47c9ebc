"""Shared random cases for the attention tests (CPU and GPU)."""

import random

import torch

from segtrain.policy import HeadPolicy

POLICY_POOL = ["none", "all", "sink:1", "sink:5", "window:3", "window:20", "sink:2+window:7", "sink:40+window:1"]


def random_case(seed: int, max_t: int = 70):
    rng = random.Random(seed)
    hkv = rng.choice([1, 2, 3])
    hq = hkv * rng.choice([1, 2, 3])
    T = rng.randint(1, max_t)
    S = rng.choice([1, 2, 5, 8, 16, max(1, T // 3), T, T + 7])
    policies = [rng.choice(POLICY_POOL) for _ in range(hkv)]
    return dict(B=rng.choice([1, 2]), Hq=hq, Hkv=hkv, T=T, S=S, D=rng.choice([4, 8]), policies=policies)


def make_qkv(B, Hq, Hkv, T, D, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def brute_force(q, k, v, S, policies, scale, carry_grad=True):
    """Per-query loop that lists each query's visible keys by DESIGN.md §1's table, word for word
    (``carry_grad=False``: the previous segment's keys detached too)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    pols = [HeadPolicy.parse(p) for p in policies]
    rows = []
    for b in range(B):
        for h in range(Hq):
            p = pols[h // G]
            for t in range(T):
                s = t // S
                keys, vals = [], []
                for j in range(T):
                    same = j // S == s and j <= t
                    previous = j // S == s - 1
                    older = j // S < s - 1
                    reads = p.all or j < p.sink or j >= (s - 1) * S - p.window
                    kj, vj = k[b, h // G, j], v[b, h // G, j]
                    if same or (previous and carry_grad):
                        keys.append(kj)
                        vals.append(vj)
                    elif previous or older and reads:
                        keys.append(kj.detach())
                        vals.append(vj.detach())
                w = torch.softmax(torch.stack(keys) @ q[b, h, t] * scale, dim=0)
                rows.append(w @ torch.stack(vals))
    return torch.stack(rows).view(B, Hq, T, -1)


def history_dropped(model):
    """``model``'s attention slots with every head's policy ``none`` (its backend, scale and segments kept): a wrong
    attention that GPU tests show their loss tolerance can tell from the right one."""
    from segtrain.attention import SegmentAttention, filled_slots

    def wrong(slot):
        return SegmentAttention(segment_size=slot.segment_size, policy="none", n_kv_heads=len(slot.policy), backend=slot.backend,
                                carry_grad=slot.carry_grad, scale=slot.scale, layer=slot.layer)  # fmt: skip

    return filled_slots(model, wrong)


def dense_blocks(num, idx, n_kv):
    """A block mask's lists (``num`` blocks per row, their indices ``idx``) as a dense ``[..., n_kv]`` boolean map."""
    dense = torch.zeros(*num.shape, n_kv, dtype=torch.bool)
    for pos in torch.nonzero(torch.ones_like(num, dtype=torch.bool)):
        i = tuple(pos.tolist())
        dense[i + (idx[i][: num[i]].long(),)] = True
    return dense
