"""The calibration file of `segtrain calibrate` (this module owns the format) and the choice of heads it implies.

``calibration.json`` holds one learned gate per (layer, KV head) in ``[0, 1]`` (1: the head's output
needs all history; 0: the bounded policy gives the same output), the bounded policy the gates mixed
against, and the budget the heads were chosen for. The choice is one rule, :func:`select_heads`: the
``round(budget * layers * heads)`` largest gates over the whole model (at least one head) read
``all``, every other head reads the bounded policy. Layers may get different numbers of ``all``
heads, as DuoAttention's retrieval heads do. ``calibrated:PATH[@BUDGET]`` on the command line
(:func:`calibrated_spec`) re-applies that rule, to the saved budget or a new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from segtrain.policy import HeadPolicy, PolicyError, PolicyTable

__all__ = [
    "CALIBRATION_FILE",
    "budget_edge",
    "FORMAT",
    "calibrated_spec",
    "calibrated_table",
    "check_bounded",
    "check_budget",
    "read_calibration",
    "select_heads",
]

CALIBRATION_FILE = "calibration.json"
FORMAT = "segtrain-calibration"
FORMAT_VERSION = 1


def check_budget(budget, where: str = "budget") -> float:
    """``budget`` as a float in ``(0, 1]``: the fraction of (layer, KV head) pairs that read all history."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise PolicyError(f"{where}: must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


def check_bounded(policy: str | HeadPolicy, seq_length: int | None = None, segment_size: int | None = None) -> HeadPolicy:
    """The bounded policy heads fall back to: it must not read all history (at ``seq_length``, if given)."""
    head = HeadPolicy.parse(policy)
    if head.all:
        raise PolicyError(f"{str(policy)!r} reads all history; give a bounded policy (none, sink:N, window:W or both)")
    if seq_length is not None and segment_size is not None:
        end = max(0, (math.ceil(seq_length / segment_size) - 2) * segment_size)  # history of the last segment
        if end == 0:
            raise PolicyError(f"at sequence length {seq_length} with segment size {segment_size} no query has history")
        if head.history_count(end) == end:
            raise PolicyError(f"{str(policy)!r} reads all {end} history keys at sequence length {seq_length}: nothing bounds it")
    return head


def select_heads(gates: Sequence[Sequence[float]], budget: float) -> list[list[bool]]:
    """Which (layer, KV head) read all history: the ``round(budget * n)`` largest gates (at least one);
    equal gates go to the earlier layer, then the earlier head, so the choice is deterministic."""
    budget = check_budget(budget)
    flat = [(-float(g), layer, head) for layer, row in enumerate(gates) for head, g in enumerate(row)]
    k = max(1, round(budget * len(flat)))
    chosen = {(layer, head) for _, layer, head in sorted(flat)[:k]}
    return [[(layer, head) in chosen for head in range(len(row))] for layer, row in enumerate(gates)]


def budget_edge(gates: Sequence[Sequence[float]], budget: float) -> tuple[float, float] | None:
    """``(last chosen gate, first passed-over gate)`` at the budget (None when every head is chosen): when the two
    are about equal, the gates did not decide which heads the budget takes."""
    ranked = sorted((float(g) for row in gates for g in row), reverse=True)
    k = sum(map(sum, select_heads(gates, budget)))
    return (ranked[k - 1], ranked[k]) if k < len(ranked) else None


def calibrated_table(gates: Sequence[Sequence[float]], budget: float, bounded: str | HeadPolicy) -> PolicyTable:
    """The policy table of :func:`select_heads`: chosen heads ``all``, the others ``bounded``."""
    full, rest = HeadPolicy.parse("all"), check_bounded(bounded)
    return PolicyTable(tuple(tuple(full if c else rest for c in row) for row in select_heads(gates, budget)))


def read_calibration(path: str | os.PathLike) -> dict:
    """A calibration record from ``calibration.json`` or a directory holding it (a calibrated model dir)."""
    path = Path(path)
    file = path / CALIBRATION_FILE if path.is_dir() else path
    if not file.is_file():
        raise PolicyError(f"{path}: no {CALIBRATION_FILE} here (write one with `segtrain calibrate`)")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{file}: not a calibration file ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PolicyError(f"{file}: not a calibration file (format is not {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise PolicyError(f"{file}: format_version {record.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    gates = record.get("gates")
    rows_ok = isinstance(gates, list) and gates and all(isinstance(r, list) and r for r in gates)
    if not rows_ok or len({len(r) for r in gates}) != 1 or not all(isinstance(g, (int, float)) for r in gates for g in r):
        raise PolicyError(f"{file}: gates must be a non-empty list of equal-length lists of numbers (layers x KV heads)")
    for key in ("budget", "bounded"):
        if key not in record:
            raise PolicyError(f"{file}: {key} is missing")
    try:
        check_budget(record["budget"])
        check_bounded(record["bounded"])
    except PolicyError as e:
        raise PolicyError(f"{file}: {e}") from None
    return record


def calibrated_spec(arg: str) -> list[list[str]]:
    """The explicit policy table (``PolicyTable.to_spec()``) of ``PATH`` or ``PATH@BUDGET`` (the part after
    ``calibrated:``): the heads the saved budget chose, or re-chosen for ``BUDGET``."""
    path, budget = arg, None
    head, sep, tail = arg.rpartition("@")
    if sep:
        with contextlib.suppress(ValueError):  # else the '@' belongs to the path
            path, budget = head, float(tail)
    if not path:
        raise PolicyError("calibrated:PATH[@BUDGET]: PATH is empty")
    record = read_calibration(path)
    if budget is not None:
        check_budget(budget, f"calibrated:{path}@BUDGET")
    return calibrated_table(record["gates"], record["budget"] if budget is None else budget, record["bounded"]).to_spec()
