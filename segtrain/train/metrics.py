"""Training logs: a JSON-lines file (one object per logged step, flushed) and TensorBoard scalars.

A run that resumes at step ``s`` first drops the rows after ``s`` (steps the interrupted run logged
but did not checkpoint, which it is about to run again), so ``metrics.jsonl`` holds each step once;
TensorBoard's ``purge_step`` does the same for its event files.
"""

from __future__ import annotations

import json
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
