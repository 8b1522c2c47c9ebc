"""Writes that a crash cannot leave half done: a temporary file or directory, then one rename."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["staged_dir", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``path`` holds the old text or the new one, never a part of either (fsync, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, overwrite: bool = True, error: type[Exception] = FileExistsError) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` when the block succeeds (removed when it fails).

    Without ``overwrite`` a non-empty ``out`` raises ``error`` naming it before anything is written.
    """
    out = Path(out)
    if not overwrite and out.exists() and any(out.iterdir()):
        raise error(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
