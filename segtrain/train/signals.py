"""Stop requests: SIGTERM, SIGINT and SIGUSR1 end training cleanly instead of killing it.

The first of these signals only sets a flag; the loop finishes its step, every rank agrees to stop at
that step (the flag travels with the step's loss all-reduce), saves a checkpoint and returns. Slurm
(``--signal``, pre-emption), Kubernetes and torchrun send SIGTERM or SIGUSR1; a terminal sends SIGINT.
A second Ctrl-C (SIGINT at least a second after the first: launchers relay the first one, sometimes
twice) aborts at once, without saving.

Before the first step (imports, process group, model, engine, data: seconds to minutes) there is no step to
finish and nothing to save: a stop signal raises :class:`StoppedDuringStartup` at once, except inside a
block that writes (``with stop.deferred():``), which completes first, so the run folder is never left half
written. The command catches it and says so in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

__all__ = ["STOP_SIGNALS", "StopRequest", "StoppedDuringStartup", "exit_status"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RELAY_WINDOW_S = 1.0  # a SIGINT this soon after the first one is the same request relayed by a launcher


def exit_status(signum: int) -> int:
    """The shell's convention for "ended by this signal" (130 for SIGINT, 143 for SIGTERM): schedulers and
    ``&&`` chains see that the run did not finish, and the checkpoint lets ``--resume auto`` continue it."""
    return 128 + signum


class StoppedDuringStartup(KeyboardInterrupt):
    """A stop signal before the first step. A ``KeyboardInterrupt``, so no ``except Exception`` in a library swallows
    it and a caller that does not know it still ends as on Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"{self.name} during startup")


class StopRequest:
    """``with StopRequest(announce=rank == 0) as stop:`` ... ``stop.signum`` is None until a stop signal arrives.

    Handlers are installed only in the main thread (Python's rule) and the previous ones come back when the
    outermost ``with`` ends (entering again, e.g. the command's request in the loop, changes nothing).
    ``describe_abort()`` gives the end of the message a second Ctrl-C prints (which checkpoint is left).
    ``starting=True``: until :meth:`started`, a stop signal raises :class:`StoppedDuringStartup` (module docstring).
    """

    def __init__(self, *, announce: bool = True, describe_abort=None, starting: bool = False):
        self.announce = announce
        self.describe_abort = describe_abort
        self.starting = starting
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._depth = 0
        self._deferring = 0

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopRequest:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def started(self) -> None:
        """The first step begins: from now on a stop signal ends the run after the current step, with a checkpoint."""
        self.starting = False

    @contextlib.contextmanager
    def deferred(self):
        """During startup, a block that writes state: a stop signal that arrives inside it takes effect when it ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.starting and self.signum is not None and not self._deferring:
            raise StoppedDuringStartup(self.signum)

    def _say(self, message: str) -> None:
        if self.announce:
            print(f"\nsegtrain train: {message}", file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self.starting and not self._deferring:
                raise StoppedDuringStartup(signum)
            if self.starting:
                self._say(f"{signal.Signals(signum).name} during startup: stopping once the current write completes")
                return
            again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            self._say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping{again}")
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > RELAY_WINDOW_S:
            last = f"; {self.describe_abort()}" if self.describe_abort is not None else ""
            self._say(f"second Ctrl-C: aborting without saving{last}")
            os._exit(exit_status(signum))
