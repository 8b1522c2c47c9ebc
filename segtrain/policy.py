"""History policies: which older keys each KV head reads (DESIGN.md §1).

A query in segment ``s`` always sees its own segment causally and the whole previous segment
(the carried KV, with gradient). Keys before the previous segment are *history*: detached, and
visible only as the head's policy says. ``history_end(s) = max(0, (s - 1) * S)`` is where history
stops for segment ``s``; a policy picks keys in ``[0, history_end)``:

- ``none``: nothing.                      - ``all``: everything.
- ``sink:N``: ``j < N``.                   - ``window:W``: ``history_end - W <= j``.

Policies combine with ``+`` (union), e.g. ``sink:4+window:4096``. A policy is set per
(layer, KV head); query heads of a GQA group share it, so the KV cache really shrinks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from segtrain.errors import UserError

__all__ = [
    "PolicyError",
    "HeadPolicy",
    "PolicyTable",
    "as_head_policies",
    "history_end",
    "history_visible",
    "policy_tensors",
    "visible_pairs",
]


class PolicyError(UserError):
    """A history policy or policy table that cannot be used, with the offending token named."""


_TOKEN = re.compile(r"^(sink|window):(\d+)$")
_GRAMMAR = "expected 'none', 'all', 'sink:N' or 'window:W' (N, W positive integers), joined by '+'"


@dataclass(frozen=True)
class HeadPolicy:
    """History policy of one KV head. ``sink``/``window`` of 0 mean the component is absent."""

    all: bool = False
    sink: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0:
            raise PolicyError(f"sink and window must be >= 0, got sink={self.sink} window={self.window}")
        if self.all and (self.sink or self.window):
            # 'all' already reads every history key; normalise so equal policies compare equal.
            object.__setattr__(self, "sink", 0)
            object.__setattr__(self, "window", 0)

    @classmethod
    def parse(cls, text: str | HeadPolicy) -> HeadPolicy:
        if isinstance(text, HeadPolicy):
            return text
        if not isinstance(text, str):
            raise PolicyError(f"a history policy must be a string, got {type(text).__name__}: {text!r}")
        tokens = [t.strip() for t in text.split("+")]
        if tokens == ["none"]:
            return cls()
        kinds: dict[str, int | bool] = {}
        for token in tokens:
            if token == "all":
                kind, value = "all", True
            elif token == "none":
                raise PolicyError(f"bad history policy {text!r}: 'none' cannot be combined with other tokens")
            else:
                m = _TOKEN.match(token)
                if m is None or int(m.group(2)) < 1:
                    raise PolicyError(f"bad history policy {text!r}: bad token {token!r}; {_GRAMMAR}")
                kind, value = m.group(1), int(m.group(2))
            if kind in kinds:
                raise PolicyError(f"bad history policy {text!r}: token {token!r} repeats '{kind}'")
            kinds[kind] = value
        return cls(all=bool(kinds.get("all", False)), sink=int(kinds.get("sink", 0)), window=int(kinds.get("window", 0)))

    def __str__(self) -> str:
        if self.all:
            return "all"
        parts = ([f"sink:{self.sink}"] if self.sink else []) + ([f"window:{self.window}"] if self.window else [])
        return "+".join(parts) or "none"

    @property
    def reads_history(self) -> bool:
        return self.all or self.sink > 0 or self.window > 0

    def history_ranges(self, end: int) -> list[tuple[int, int]]:
        """Disjoint, sorted ``[lo, hi)`` ranges of history keys read when history stops at ``end``."""
        if end <= 0 or not self.reads_history:
            return []
        if self.all:
            return [(0, end)]
        ranges = []
        if self.sink:
            ranges.append((0, min(self.sink, end)))
        if self.window:
            lo = max(0, end - self.window)
            if ranges and lo <= ranges[0][1]:
                ranges[0] = (0, end)
            else:
                ranges.append((lo, end))
        return ranges

    def history_count(self, end: int) -> int:
        return sum(hi - lo for lo, hi in self.history_ranges(end))

    def retained_ranges(self, segment: int, segment_size: int) -> list[tuple[int, int | None]]:
        """Key ranges a KV cache must keep while queries are in ``segment`` (``None``: open end).

        The history this head still reads, plus everything from the previous segment on. Each
        range's lower end only grows with the segment, so a dropped key is never read again.
        """
        end = history_end(segment, segment_size)
        ranges: list[tuple[int, int | None]] = list(self.history_ranges(end))
        if ranges and ranges[-1][1] == end:
            return ranges[:-1] + [(ranges[-1][0], None)]
        return ranges + [(end, None)]


def history_end(segment: int, segment_size: int) -> int:
    """First key that is *not* history for queries of ``segment``: the start of the previous segment."""
    return max(0, (segment - 1) * segment_size)


def as_head_policies(policy: str | HeadPolicy | Sequence[str | HeadPolicy], n_kv_heads: int) -> tuple[HeadPolicy, ...]:
    """One ``HeadPolicy`` per KV head. A single string or policy applies to every head."""
    if isinstance(policy, (str, HeadPolicy)):
        return (HeadPolicy.parse(policy),) * n_kv_heads
    policies = tuple(HeadPolicy.parse(p) for p in policy)
    if len(policies) != n_kv_heads:
        raise PolicyError(f"policy has {len(policies)} entries for {n_kv_heads} KV heads: give one per KV head")
    return policies


def policy_tensors(policies: Sequence[HeadPolicy], device: torch.device | str | None = None):
    """``(all: bool[H], sink: int64[H], window: int64[H])``, the form kernels and masks read."""
    all_ = torch.tensor([p.all for p in policies], dtype=torch.bool, device=device)
    sink = torch.tensor([p.sink for p in policies], dtype=torch.int64, device=device)
    window = torch.tensor([p.window for p in policies], dtype=torch.int64, device=device)
    return all_, sink, window


def history_visible(all_, sink, window, key, end):
    """Vectorised policy predicate: is ``key`` a history key that the head reads, history ending at ``end``.

    Every argument broadcasts; ``end`` may be negative (segment 0), which reads nothing.
    """
    return (key < end) & (all_ | (key < sink) | (key >= end - window))


def visible_pairs(seq_len: int, segment_size: int, policies: Sequence[HeadPolicy]) -> int:
    """Number of visible (query, key) pairs summed over KV heads: FLOP counting on visible keys only."""
    S, total_band, hist = segment_size, 0, [0] * len(policies)
    for s in range(math.ceil(seq_len / S)):
        lo, hi = s * S, min(seq_len, (s + 1) * S)
        n = hi - lo
        prev = min(S, lo)  # keys of the previous segment
        total_band += n * prev + n * (n + 1) // 2
        end = history_end(s, S)
        for h, p in enumerate(policies):
            hist[h] += n * p.history_count(end)
    return total_band * len(policies) + sum(hist)


@dataclass(frozen=True)
class PolicyTable:
    """History policy per (layer, KV head): ``layers[i][h]``."""

    layers: tuple[tuple[HeadPolicy, ...], ...]

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.layers}
        if not self.layers or len(widths) != 1 or 0 in widths:
            raise PolicyError(f"a policy table needs the same, non-zero number of KV heads in every layer, got {sorted(widths)}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_kv_heads(self) -> int:
        return len(self.layers[0])

    def __getitem__(self, layer: int) -> tuple[HeadPolicy, ...]:
        return self.layers[layer]

    @classmethod
    def uniform(cls, n_layers: int, n_kv_heads: int, policy: str | HeadPolicy) -> PolicyTable:
        return cls(((HeadPolicy.parse(policy),) * n_kv_heads,) * n_layers)

    @classmethod
    def first_k(cls, n_layers: int, n_kv_heads: int, k: int, policy: str = "all", rest: str = "none") -> PolicyTable:
        """The first ``k`` KV heads of every layer read ``policy``; the others ``rest``."""
        if not 0 <= k <= n_kv_heads:
            raise PolicyError(f"first_k: k={k} must be between 0 and n_kv_heads={n_kv_heads}")
        row = (HeadPolicy.parse(policy),) * k + (HeadPolicy.parse(rest),) * (n_kv_heads - k)
        return cls((row,) * n_layers)

    @classmethod
    def from_spec(cls, spec, n_layers: int, n_kv_heads: int) -> PolicyTable:
        """Build from a config value.

        - ``"sink:4+window:1024"``: one policy for every head;
        - ``{"first_k": 2, "policy": "all", "rest": "none"}``, or ``{"fraction": 0.25, ...}`` (rounded);
        - a list with one entry per layer, each a string (every head of that layer) or a list with
          one string per KV head.
        """
        if isinstance(spec, (str, HeadPolicy)):
            return cls.uniform(n_layers, n_kv_heads, spec)
        if isinstance(spec, PolicyTable):
            table = spec
        elif isinstance(spec, dict):
            unknown = set(spec) - {"first_k", "fraction", "policy", "rest"}
            if unknown or ("first_k" in spec) == ("fraction" in spec):
                raise PolicyError(
                    f"policy spec {spec!r}: give exactly one of 'first_k' or 'fraction', plus optional 'policy' "
                    f"and 'rest'" + (f"; unknown keys {sorted(unknown)}" if unknown else "")
                )
            if "fraction" in spec:
                frac = float(spec["fraction"])
                if not 0.0 <= frac <= 1.0:
                    raise PolicyError(f"policy spec fraction={frac} must be in [0, 1]")
                k = round(frac * n_kv_heads)
            else:
                k = int(spec["first_k"])
            table = cls.first_k(n_layers, n_kv_heads, k, spec.get("policy", "all"), spec.get("rest", "none"))
        elif isinstance(spec, Iterable):
            rows = []
            for i, row in enumerate(spec):
                try:
                    rows.append(as_head_policies(row, n_kv_heads))
                except PolicyError as e:
                    raise PolicyError(f"policy table layer {i}: {e}") from None
            table = cls(tuple(rows))
        else:
            raise PolicyError(f"cannot build a policy table from {type(spec).__name__}: {spec!r}")
        if table.n_layers != n_layers or table.n_kv_heads != n_kv_heads:
            raise PolicyError(
                f"policy table is {table.n_layers} layers x {table.n_kv_heads} KV heads, the model has {n_layers} x {n_kv_heads}"
            )
        return table

    def to_spec(self) -> list[list[str]]:
        """Explicit per-layer, per-head strings: what checkpoints and HF configs store."""
        return [[str(p) for p in row] for row in self.layers]

    def shard(self, rank: int, world: int) -> PolicyTable:
        """The KV heads a tensor-parallel rank owns (contiguous blocks), with their policies."""
        if self.n_kv_heads % world:
            raise PolicyError(f"{self.n_kv_heads} KV heads do not split over tensor-parallel size {world}")
        n = self.n_kv_heads // world
        return PolicyTable(tuple(row[rank * n : (rank + 1) * n] for row in self.layers))
