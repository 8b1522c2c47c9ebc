"""What ``segtrain calibrate`` learns, as options that name their flags; torch-free, so ``--help`` stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from segtrain.errors import UserError

__all__ = ["CalibrationError", "CalibrationOptions", "check_options", "fitted"]

SEGMENTS = 4  # the default sequence: this many segments (16384 tokens at the 1B shape's 4096), or what the tasks need
SPARE = 1.25  # room over the longest of the first samples: later samples vary a little
SINK, WINDOW = 64, 1024  # the bounded heads' default, at most a quarter and a half of a segment


class CalibrationError(UserError):
    """A calibration request that cannot run; the message starts with the ``segtrain calibrate`` flag at fault."""


@dataclass(frozen=True)
class CalibrationOptions:
    """What is learned; each field is the ``segtrain calibrate`` flag of the same name."""

    budget: float = 0.25
    bounded: str | None = None  # None: sink:64+window:1024, each within a fraction of the segment (:func:`fitted`)
    seq_length: int | None = None  # None: a few segments of the model, enough for the tasks (:func:`fitted`)
    segment_size: int | None = None  # None: the model's
    tasks: tuple[str, ...] = ("passkey", "needle", "recall")
    task_options: dict = field(default_factory=dict)  # per task, as data.synthetic_options: {"passkey": {"digits": 2}}
    steps: int = 2000
    batch_size: int = 1
    lr: float = 0.02
    l1: float = 0.05
    seed: int = 0

    def learning(self, model: str, segment_size: int) -> dict:
        """The options a resumed run must share with the saved one (the budget only picks heads afterwards;
        more or fewer steps continue the same sequence of batches)."""
        skip = {"budget", "steps", "segment_size"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**values, "tasks": list(self.tasks), "task_options": dict(self.task_options), "model": model,
                "segment_size": segment_size}  # fmt: skip


def fitted(options: CalibrationOptions, segment_size: int, max_positions: int, needed: int) -> CalibrationOptions:
    """``options`` with the ``seq_length`` and ``bounded`` the user left out chosen for this model, so the defaults run
    as well on a 16-token-segment toy as on a 1B model: :data:`SEGMENTS` segments, more when the tasks' samples need
    ``needed`` tokens (with :data:`SPARE`), fewer when that stays within ``max_positions``; bounded heads keep
    ``sink:64+window:1024``, each at most a quarter and a half of a segment."""
    seq_length, bounded = options.seq_length, options.bounded
    if seq_length is None:
        enough = math.ceil(needed * SPARE / segment_size) * segment_size
        seq_length = max(SEGMENTS * segment_size, enough)
        trained = max_positions // segment_size * segment_size  # RoPE positions the model knows, when it has room
        if enough <= trained < seq_length and trained > 2 * segment_size:
            seq_length = trained
    if bounded is None:
        bounded = f"sink:{min(SINK, max(1, segment_size // 4))}+window:{min(WINDOW, max(1, segment_size // 2))}"
    return replace(options, seq_length=seq_length, bounded=bounded)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(options: CalibrationOptions, segment_size: int) -> None:
    """Every option valid for a model run at ``segment_size``; errors name the flag. ``seq_length`` and ``bounded``
    are checked when given (after :func:`fitted` they always are)."""
    from segtrain.checkpoint.calibration import check_bounded, check_budget
    from segtrain.data.synthetic import TASKS
    from segtrain.policy import PolicyError

    for name in ("seq_length", "steps", "batch_size", "segment_size"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CalibrationError(f"{_flag(name)}: must be a positive integer, got {value!r}")
    if not options.lr > 0:
        raise CalibrationError(f"--lr: must be > 0, got {options.lr!r}")
    if not options.l1 >= 0:
        raise CalibrationError(f"--l1: must be >= 0, got {options.l1!r}")
    unknown = [t for t in options.tasks if t not in TASKS] or ([] if options.tasks else ["(none)"])
    if unknown:
        raise CalibrationError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    opts = options.task_options
    if not isinstance(opts, dict) or any(t not in options.tasks or not isinstance(o, dict) for t, o in opts.items()):
        raise CalibrationError(
            f"--task-options: must map some of the tasks ({', '.join(options.tasks)}) to objects of options, got {opts!r}"
        )
    if options.seq_length is not None and options.seq_length <= 2 * segment_size:
        raise CalibrationError(
            f"--seq-length: {options.seq_length} tokens at segment size {segment_size} leave no history to calibrate "
            f"(need more than 2 x {segment_size})"
        )
    checks = [("budget", lambda: check_budget(options.budget))]
    if options.bounded is not None:
        checks.append(("bounded", lambda: check_bounded(options.bounded, options.seq_length, segment_size)))
    for name, check in checks:
        try:
            check()
        except PolicyError as e:
            raise CalibrationError(f"{_flag(name)}: {str(e).removeprefix('budget: ')}") from None
