"""What ``segtrain calibrate`` learns, as options that name their flags; torch-free, so ``--help`` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from segtrain.errors import UserError

__all__ = ["CalibrationError", "CalibrationOptions", "check_options"]


class CalibrationError(UserError):
    """A calibration request that cannot run; the message starts with the ``segtrain calibrate`` flag at fault."""


@dataclass(frozen=True)
class CalibrationOptions:
    """What is learned; each field is the ``segtrain calibrate`` flag of the same name."""

    budget: float = 0.25
    bounded: str = "sink:64+window:1024"
    seq_length: int = 16384
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(options: CalibrationOptions, segment_size: int) -> None:
    """Every option valid for a model run at ``segment_size``; errors name the flag."""
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
    if options.seq_length <= 2 * segment_size:
        raise CalibrationError(
            f"--seq-length: {options.seq_length} tokens at segment size {segment_size} leave no history to calibrate "
            f"(need more than 2 x {segment_size})"
        )
    for name, check in (("budget", lambda: check_budget(options.budget)),
                        ("bounded", lambda: check_bounded(options.bounded, options.seq_length, segment_size))):  # fmt: skip
        try:
            check()
        except PolicyError as e:
            raise CalibrationError(f"{_flag(name)}: {str(e).removeprefix('budget: ')}") from None
