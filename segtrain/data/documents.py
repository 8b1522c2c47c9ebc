"""Documents from input files: one reader for tokenizer training, preprocessing and the default corpus.

A ``.jsonl`` file holds one document per line (the ``text`` field, or another key); any other file is
one document (its whole text). Inputs are files, directories (every file inside, sorted) or glob
patterns, so the same list of inputs always yields the same documents in the same order.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from segtrain.errors import UserError


class InputError(UserError):
    """An input path or record that cannot be read; the message names the path (and line)."""


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike], *, argument: str = "input") -> list[Path]:
    """Files named by ``inputs`` (files, directories, glob patterns), in a deterministic order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.fspath(item), recursive=True) if Path(p).is_file())
        if not found:
            raise InputError(f"{argument}: {os.fspath(item)} matches no readable file")
        files.extend(found)
    return files


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def iter_documents(inputs, *, text_key: str = "text", argument: str = "input") -> Iterator[str]:
    """Each document's text, in input order (see the module docstring for the formats)."""
    for path in expand_inputs(inputs, argument=argument):
        if is_jsonl(path):
            yield from _jsonl_texts(path, text_key)
        else:
            yield _read_text(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise InputError(f"{path}:{line_no}: no {text_key!r} field")
            text = record[text_key]
            if not isinstance(text, str):
                raise InputError(f"{path}:{line_no}: field {text_key!r} is {type(text).__name__}, not a string")
            yield text
