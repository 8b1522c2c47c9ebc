"""Training logs: a JSON-lines file (one object per logged step, flushed) and TensorBoard scalars.

A run that resumes at step ``s`` first drops the rows after ``s`` (steps the interrupted run logged
but did not checkpoint, which it is about to run again), so ``metrics.jsonl`` holds each step once;
TensorBoard's ``purge_step`` does the same for its event files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.checkpoint.run import METRICS


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``path`` logged at steps <= ``step`` (a line cut short by a crash is dropped)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    return keep


class MetricsLog:
    """Rank 0 only; other ranks get an instance that does nothing. ``start_step``: the step the run resumes at."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, *, start_step: int = 0):
        self.enabled = enabled
        self.file = self.writer = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS
        if path.is_file():
            keep = _rows_up_to(path, start_step)
            write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.file = open(path, "a")  # noqa: SIM115 (open for the run, closed by close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines still work
                self.writer = None
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class StepTimes:
    """Where the loop's wall-clock time goes: each :meth:`lap` adds the time since the previous lap to a phase, and
    :meth:`means` gives each phase's mean per step since the last call as ``time_<phase>_s``.

    The loop's phases: ``data`` (reading and collating the micro-batches, copying them to the device), ``step``
    (forward, backward and update, until the step's loss is on the host: the loop's one synchronisation per step, so
    the laps cost no extra sync and the phases add up to the step's wall time), ``host`` (logging and the progress
    bar) and ``save`` (checkpoints). What the loop adds to the bare step (``tools/bench_loop.py``) is read here.
    """

    PHASES = ("data", "step", "host", "save")

    def __init__(self):
        self.last = time.perf_counter()
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now
        self.steps += phase == "step"

    def means(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        out = {f"time_{phase}_s": total / steps for phase, total in self.totals.items()}
        self.totals, self.steps = dict.fromkeys(self.PHASES, 0.0), 0
        return out
