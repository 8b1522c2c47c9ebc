"""A brute-force oracle of segment attention, written from DESIGN.md §1 alone.

It imports nothing from ``segtrain``: the policy strings are parsed here, and the keys a query sees are listed
one position at a time, straight from the table in §1, and one softmax runs over each query's list. So a bug in
``segtrain.policy`` (which every backend, context parallelism and the KV cache read) cannot also be in the judge.
Python loops over positions: tests keep sequences short.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Policy:
    """One KV head's history policy: ``all``, ``sink:N``, ``window:W``, joined by ``+``; ``none`` alone."""

    all: bool = False
    sink: int = 0  # 0: no sink
    window: int = 0  # 0: no window


def parse(text: str) -> Policy:
    """DESIGN.md §1's grammar: ``none``, or one or more of ``all``, ``sink:N``, ``window:W`` joined by ``+``."""
    if text.strip() == "none":
        return Policy()
    fields: dict[str, int | bool] = {}
    for token in (t.strip() for t in text.split("+")):
        name, _, number = token.partition(":")
        if token == "all":
            fields["all"] = True
        elif name in ("sink", "window") and number.isdigit() and int(number) > 0:
            fields[name] = int(number)
        else:
            raise ValueError(f"oracle cannot parse policy {text!r} (token {token!r})")
    return Policy(**fields)


def reads(policy: Policy, key: int, query_segment: int, segment_size: int) -> bool:
    """Whether a head reads history ``key`` (a key of a segment before ``query_segment - 1``), by §1's list:
    ``all`` every one; ``sink:N`` ``key < N``; ``window:W`` the ``W`` keys just before the previous segment."""
    previous_start = (query_segment - 1) * segment_size
    in_window = previous_start - policy.window <= key < previous_start
    return policy.all or key < policy.sink or (policy.window > 0 and in_window)


def visible_keys(t: int, segment_size: int, policy: Policy, carry_grad: bool = True) -> tuple[list[int], list[int]]:
    """``(with_gradient, detached)``: the keys a query at ``t`` sees, each listed by walking every position ``j``."""
    s = t // segment_size
    with_gradient, detached = [], []
    for j in range(t + 1):  # no visible key lies after the query
        sj = j // segment_size
        if sj == s:  # own segment, causal
            with_gradient.append(j)
        elif sj == s - 1:  # the carried segment, all of it
            (with_gradient if carry_grad else detached).append(j)
        elif reads(policy, j, s, segment_size):  # history: detached
            detached.append(j)
    return with_gradient, detached


def masks(seq_len: int, segment_size: int, policy: Policy, carry_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(with_gradient, detached)`` boolean ``[T, T]`` masks (query row, key column) from :func:`visible_keys`."""
    with_gradient = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    detached = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for t in range(seq_len):
        live, past = visible_keys(t, segment_size, policy, carry_grad)
        with_gradient[t, live] = True
        detached[t, past] = True
    return with_gradient, detached


def document_masks(positions: list[int], segment_size: int, policy: Policy, carry_grad: bool = True):
    """:func:`masks` of a packed row in document mode (DESIGN.md §1 "Documents"): ``positions`` restart at 0 where a
    document starts; a query at in-document position ``p`` sees the keys a query at ``p`` sees alone, shifted to where
    its document starts, and nothing of another document."""
    T = len(positions)
    with_gradient = torch.zeros(T, T, dtype=torch.bool)
    detached = torch.zeros(T, T, dtype=torch.bool)
    for t, p in enumerate(positions):
        start = t - p  # its document's first token
        assert positions[start] == 0 and all(positions[start + i] == i for i in range(p + 1)), positions
        live, past = visible_keys(p, segment_size, policy, carry_grad)
        with_gradient[t, [start + j for j in live]] = True
        detached[t, [start + j for j in past]] = True
    return with_gradient, detached


def attention(q, k, v, segment_size: int, policies, scale: float | None = None, carry_grad: bool = True, positions=None):
    """Segment attention of ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` in float64: one softmax per query over the keys
    :func:`visible_keys` lists. Detached keys enter as ``k.detach()``, ``v.detach()``, so history gets no gradient.

    ``policies``: one string per KV head, or one for every head. Query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    ``positions``: document mode, one list of in-document positions per row (:func:`document_masks`).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    names = [policies] * Hkv if isinstance(policies, str) else list(policies)
    assert len(names) == Hkv, (names, Hkv)
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    heads = []
    for h, name in enumerate(names):
        if positions is None:
            live, past = masks(T, segment_size, parse(name), carry_grad)
        else:  # [B, 1, T, T]: one layout per row
            rows = [document_masks(list(row), segment_size, parse(name), carry_grad) for row in positions]
            live, past = (torch.stack([r[i] for r in rows])[:, None] for i in (0, 1))
        queries = q[:, h * G : (h + 1) * G]  # [B, G, T, D]: the query heads that read KV head h
        scores_live = queries @ k[:, h, None].transpose(-1, -2) * scale
        scores_past = queries @ k.detach()[:, h, None].transpose(-1, -2) * scale
        logits = torch.where(live, scores_live, torch.where(past, scores_past, -math.inf))
        p = torch.softmax(logits, dim=-1)  # a query always sees itself: no empty row
        heads.append((p * live) @ v[:, h, None] + (p * past) @ v.detach()[:, h, None])
    return torch.cat(heads, dim=1)


def readable_keys(last: int, segment_size: int, policy: Policy) -> list[int]:
    """Keys up to ``last`` that some query of ``last``'s segment (at ``last`` or later) sees: what a cache must hold."""
    s = last // segment_size
    end = (s + 1) * segment_size
    keys = set()
    for t in range(last, end):
        live, past = visible_keys(t, segment_size, policy)
        keys.update(j for j in live + past if j <= last)
    return sorted(keys)


# ---- random cases ---------------------------------------------------------------------------------------------------


def random_policy(rng: random.Random, segment_size: int, seq_len: int) -> str:
    """Every kind and combination; sinks and windows short enough that their edges fall inside history."""
    history = max(1, seq_len - 2 * segment_size)  # the longest history any query sees
    n = rng.randint(1, max(1, history - 1))
    w = rng.randint(1, max(1, history - 1))
    return rng.choice(
        ["none", "all", f"sink:{n}", f"window:{w}", f"sink:{n}+window:{w}", f"window:{w}+sink:{n}", f"all+window:{w}",
         f"sink:{rng.randint(1, segment_size)}+window:{rng.randint(1, segment_size)}"]
    )  # fmt: skip


def random_case(seed: int, max_segments: int = 6) -> dict:
    """At least 4 segments; the last one partial in most cases; GQA in most; ``carry_grad`` either way."""
    rng = random.Random(seed)
    S = rng.choice([1, 2, 3, 4, 5, 7])
    n_segments = rng.randint(4, max_segments)
    partial = rng.random() < 0.8
    T = (n_segments - 1) * S + (rng.randint(1, S - 1) if partial and S > 1 else S)
    Hkv = rng.choice([1, 2, 3])
    return dict(
        B=rng.choice([1, 2]),
        Hq=Hkv * rng.choice([1, 2, 3]),
        Hkv=Hkv,
        T=T,
        S=S,
        D=rng.choice([4, 8]),
        policies=[random_policy(rng, S, T) for _ in range(Hkv)],
        carry_grad=rng.random() < 0.6,
    )


def random_documents(rng: random.Random, T: int, S: int) -> list[int]:
    """In-document positions of a packed row of length ``T``: short documents (under a segment) and long ones
    (several segments), so documents start inside segments and span segment boundaries."""
    positions: list[int] = []
    while len(positions) < T:
        n = rng.choice([1, rng.randint(1, S), rng.randint(S, 4 * S + 1)])
        positions += list(range(min(n, T - len(positions))))
    return positions


def make_qkv(c: dict, seed: int, requires_grad: bool = True):
    """Random float64 ``q, k, v`` (never zeros) and an upstream gradient for the output."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(c["B"], h, c["T"], c["D"]) for h in (c["Hq"], c["Hkv"], c["Hkv"], c["Hq"])]
    q, k, v, w = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), v.requires_grad_(requires_grad), w
