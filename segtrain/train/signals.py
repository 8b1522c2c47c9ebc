"""Stop requests: SIGTERM, SIGINT and SIGUSR1 end training cleanly instead of killing it.

The first of these signals only sets a flag; the loop finishes its step, every rank agrees to stop at
that step (the flag travels with the step's loss all-reduce), saves a checkpoint and returns. Slurm
(``--signal``, pre-emption), Kubernetes and torchrun send SIGTERM or SIGUSR1; a terminal sends SIGINT.
A second Ctrl-C (SIGINT at least a second after the first: launchers relay the first one, sometimes
twice) aborts at once, without saving.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["STOP_SIGNALS", "StopRequest", "exit_status"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RELAY_WINDOW_S = 1.0  # a SIGINT this soon after the first one is the same request relayed by a launcher


def exit_status(signum: int) -> int:
    """The shell's convention for "ended by this signal" (130 for SIGINT, 143 for SIGTERM): schedulers and
    ``&&`` chains see that the run did not finish, and the checkpoint lets ``--resume auto`` continue it."""
    return 128 + signum


class StopRequest:
    """``with StopRequest(announce=rank == 0) as stop:`` ... ``stop.signum`` is None until a stop signal arrives.

    Handlers are installed only in the main thread (Python's rule) and the previous ones come back on exit.
    ``describe_abort()`` gives the end of the message a second Ctrl-C prints (which checkpoint is left).
    """

    def __init__(self, *, announce: bool = True, describe_abort=None):
        self.announce = announce
        self.describe_abort = describe_abort
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _say(self, message: str) -> None:
        if self.announce:
            print(f"\nsegtrain train: {message}", file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            self._say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping{again}")
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > RELAY_WINDOW_S:
            last = f"; {self.describe_abort()}" if self.describe_abort is not None else ""
            self._say(f"second Ctrl-C: aborting without saving{last}")
            os._exit(exit_status(signum))
