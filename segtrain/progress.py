"""Progress that reads well on a terminal and in a log file: the one way segtrain shows progress.

On a terminal, :func:`show_progress` is a tqdm bar. When stderr is not a terminal (a log file, a pipe, a batch job),
tqdm's carriage-return redraws pile up into one line of many kilobytes, so a :class:`ProgressLines` prints a short
line instead: after the first update, at each tenth of the way, at least every ``every_s`` seconds, and at the end::

    train 40/200 (20%) 3.1 it/s eta 52s loss=6.88 lr=1.5e-04
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["ProgressLines", "show_progress"]

EVERY_S = 30.0  # seconds between lines when no tenth of the way has passed
PARTS = 10  # a line at each tenth of a known total


def show_progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    initial: int = 0,
    unit: str = "it",
    unit_bytes: bool = False,
    enabled: bool = True,
    every_s: float = EVERY_S,
):
    """A tqdm bar on a terminal, else :class:`ProgressLines`; both take ``update(n)``, ``set_postfix(**values)``,
    ``close()``, ``with`` and iteration over ``iterable``. ``unit_bytes``: counts are bytes (shown in KiB/MiB/GiB)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = sys.stderr
    if enabled and not _is_terminal(stream):
        return ProgressLines(iterable, total=total, desc=desc, initial=initial, unit=unit, unit_bytes=unit_bytes,
                             stream=stream, every_s=every_s)  # fmt: skip
    from tqdm import tqdm

    scale = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if unit_bytes else {"unit": unit}
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, **scale)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressLines:
    """Progress as short lines on ``stream`` (no carriage returns): after the first update, at each tenth of
    ``total``, at least every ``every_s`` seconds while work goes on, and once at the end."""

    def __init__(self, iterable=None, *, total=None, desc="", initial=0, unit="it", unit_bytes=False, stream=None,
                 every_s=EVERY_S, clock=time.monotonic):  # fmt: skip
        self.iterable, self.total, self.desc, self.unit, self.unit_bytes = iterable, total, desc, unit, unit_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.n = self.initial = self._shown_n = initial
        self.postfix: dict[str, object] = {}
        self._start = self._shown_at = clock()
        self._part = self._part_of(initial)
        self._closed = False

    def _part_of(self, n: int) -> int:
        return math.floor(PARTS * n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now, part = self.clock(), self._part_of(self.n)
        first = self._shown_n == self.initial < self.n  # the first work done says that it runs, and how fast
        if first or part > self._part or now - self._shown_at >= self.every_s:
            self._part = part
            self._show(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        """Values shown after the counts (``loss=6.88``); ``refresh`` is accepted for tqdm's signature."""
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._shown_n:
                self._show(self.clock())

    def line(self, now: float | None = None) -> str:
        """The current progress in one line: ``desc n/total (p%) rate eta``, then the postfix values."""
        elapsed = (self.clock() if now is None else now) - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        count = self._amount(self.n) + (f"/{self._amount(self.total)}" if self.total else "")
        parts = [self.desc, count]
        if self.total:
            parts.append(f"({math.floor(100 * self.n / self.total)}%)")
        if rate > 0:
            parts.append(f"{self._amount(rate, rate=True)}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if self.total is None or self.n >= self.total:
            parts.append(f"in {_duration(elapsed)}")
        parts += [f"{k}={_value(v)}" for k, v in self.postfix.items()]
        return " ".join(p for p in parts if p)

    def _amount(self, value: float, rate: bool = False) -> str:
        if self.unit_bytes:
            for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if value >= scale:
                    return f"{value / scale:.1f} {name}"
            return f"{value:.0f} B"
        if rate:
            return f"{value:.3g} {self.unit}"
        count = f"{value:.0f}" if float(value).is_integer() else f"{value:g}"
        return count if self.total is not None else f"{count} {self.unit}"

    def _show(self, now: float) -> None:
        self._shown_at, self._shown_n = now, self.n
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
