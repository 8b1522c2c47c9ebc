"""Library messages during training go to the run's log file (``OUT/logs/rank<N>.log``), not to the console.

How they reach the console otherwise: DeepSpeed's logger ("DeepSpeed") prints WARNING and up to stdout
through its own handler and does not propagate; megatron-core and torch.distributed log through
``logging.getLogger(__name__)`` (no handlers: Python's last-resort handler prints WARNING and up to
stderr); both warn with ``warnings.warn`` (megatron-core four times at import when Apex and Transformer
Engine are missing). Inside :func:`library_log` the loggers of :data:`LIBRARY_LOGGERS` and the Python
warnings raised in the files of :data:`LIBRARY_PACKAGES` go to the file instead; records of ERROR and up
also still reach stderr. Everything else (segtrain's own lines, warnings raised from segtrain's calls or
other packages) is untouched. Until the run folder is claimed the messages wait in memory; a crash before
that prints them (they may explain it), a mistake in the config drops them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from segtrain.errors import UserError

__all__ = ["LIBRARY_LOGGERS", "LIBRARY_PACKAGES", "LOGS", "LibraryLog", "library_log", "log_file"]

LIBRARY_LOGGERS = ("DeepSpeed", "megatron", "torch.distributed")
LIBRARY_PACKAGES = ("deepspeed", "megatron", "torch.distributed")
LOGS = "logs"  # OUT/logs/: one file per rank


def log_file(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / LOGS / f"rank{rank}.log"


def _package_dirs(packages: tuple[str, ...]) -> dict[str, str]:
    """``{source folder: package}`` for ``packages`` (found without importing them), each folder ending in a separator."""
    dirs = {}
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs[os.path.join(os.path.realpath(location), "")] = name
    return dirs


def _package_of(filename: str, dirs: dict[str, str]) -> str | None:
    path = os.path.realpath(filename)
    return next((name for folder, name in dirs.items() if path.startswith(folder)), None)


class LibraryLog(logging.Handler):
    """The handler on the library loggers: holds records until :meth:`open` names the file, then writes each as it comes."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            print(f"{record.name}: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def open(self, path: Path, *, append: bool) -> None:
        """Write to ``path`` from now on (``append``: a resumed run keeps what the earlier ones wrote)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.pending:
            self.file.emit(record)
        self.pending.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()

    def warning_from(self, library: str, text: str) -> None:
        self.handle(logging.makeLogRecord({"name": library, "levelno": logging.WARNING, "levelname": "WARNING", "msg": text}))


@contextlib.contextmanager
def library_log() -> Iterator[LibraryLog]:
    """Route the library loggers and warnings to a :class:`LibraryLog` for the block; restored afterwards."""
    log = LibraryLog()
    dirs = _package_dirs(LIBRARY_PACKAGES)
    previous_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        package = _package_of(filename, dirs) if file is None else None
        if package is not None:
            log.warning_from(package, warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        else:
            previous_showwarning(message, category, filename, lineno, file, line)

    saved = []
    warnings.showwarning = showwarning
    try:
        from segtrain.compat.deepspeed import deepspeed_logger

        deepspeed_logger()  # imported first: it sets up its handler and propagate=False when its module loads
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers, logger.propagate = [log], False
        yield log
    except (UserError, KeyboardInterrupt):  # the user's mistake or the user's stop: the library's lines do not matter
        raise
    except BaseException:
        if log.file is None and log.pending:  # the run folder was never reached: these lines may say why
            for record in log.pending:
                print(log.format(record), file=sys.stderr)
        raise
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        warnings.showwarning = previous_showwarning
        log.close()
