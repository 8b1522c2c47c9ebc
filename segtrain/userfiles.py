"""Opening what a user names: a path that must exist, a JSON file that must hold an object.

Each failure is a :class:`~segtrain.errors.UserError` naming the flag or the file, so every command says
"does not exist" or "is not valid JSON" the same way, before a later step misreads the cause (a missing
model directory reported as "no tokenizer files here", a broken ``config.json`` as a bare parser message).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from segtrain.errors import UserError

__all__ = ["existing_path", "read_json"]


def existing_path(
    path: str | os.PathLike, flag: str | None = None, *, kind: str = "any", error: type[UserError] = UserError
) -> Path:
    """``path`` as a :class:`Path`; else ``error`` (a ``UserError``), after ``flag: `` when given: it does not exist,
    or it is not the ``kind`` asked for (``"dir"``, ``"file"``, or ``"any"``)."""
    file, where = Path(path), f"{flag}: " if flag else ""
    if not file.exists():
        raise error(f"{where}{path} does not exist")
    if kind == "dir" and not file.is_dir():
        raise error(f"{where}{path} is not a directory")
    if kind == "file" and not file.is_file():
        raise error(f"{where}{path} is not a file")
    return file


def read_json(path: str | os.PathLike, *, error: type[UserError] = UserError) -> dict:
    """The JSON object in the file ``path`` (every JSON file segtrain reads holds one); else ``error`` (a ``UserError``)
    naming the file: it cannot be read, is not JSON, or holds another kind of value."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value
