"""SIGINT and SIGTERM during ``segtrain calibrate``: ``--out`` is left resumable or as it was, never empty.

Before learning starts nothing has been written, so a signal stops the job at once. While learning (inside
``stop.deferred()``) the first signal only sets ``stop.signum``: the job finishes its step, saves its resumable
state and raises :class:`CalibrationStopped`. A second signal then stops at once, leaving the last state saved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["CalibrationStopped", "StopSignals", "ignore_in_worker"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CalibrationStopped(KeyboardInterrupt):
    """A stop signal ended the job. ``saved_step``: the step whose state is saved in ``--out`` (None: nothing was written);
    ``exit_status``: the shell's code for that signal (130, 143)."""

    def __init__(self, signum: int, saved_step: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved_step = signum, saved_step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def ignore_in_worker(worker_id: int) -> None:
    """A data loader's ``worker_init_fn``: a SIGTERM or Ctrl-C sent to the whole process group (a terminal, Slurm,
    Kubernetes) leaves the workers serving, so the main process can finish its step and save; they exit with it."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """``with StopSignals() as stop:`` handles SIGINT and SIGTERM (main thread only; the old handlers come back)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._defer = False
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def deferred(self):
        """Inside: the first signal waits for the caller (``signum`` is set) instead of stopping at once."""
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked process that has not replaced this handler: the main process decides
            return
        if self._defer and self.signum is None:
            self.signum = signum
            print(f"\nsegtrain calibrate: {signal.Signals(signum).name}: finishing this step, then saving the state "
                  "and stopping (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip
            return
        raise CalibrationStopped(signum)
