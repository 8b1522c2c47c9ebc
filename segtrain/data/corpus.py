"""The embedded default corpus: text every Python installation ships, so the demo and tests need no download.

Documents come from the standard library (``sysconfig.get_paths()['stdlib']``, without tests, IDLE,
site-packages and the platform's ``_sysconfigdata``), modules in sorted order. For each module: one
document of its docstrings (English prose: the module's, then each class's and function's under its
qualified name) and, for every third module, one of its source code. Same Python version, same bytes.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
SOURCE_EVERY = 3  # one module in three also contributes its source: prose and code in about equal parts
MAX_SOURCE_BYTES = 64_000  # no single huge module dominates
DEFAULT_MAX_BYTES = 4_000_000  # about the whole standard library's prose plus a third of its code


def stdlib_modules(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files that are the same on every machine, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: never walk into site-packages (it can hold gigabytes of installed packages).
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        rel_dir = Path(dirpath).relative_to(root)
        found += [rel_dir / f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return [root / rel for rel in sorted(found, key=lambda p: p.as_posix())]


def module_docstrings(source: str, module: str) -> str:
    """A module's docstrings as one text: each under a ``# qualified.name`` heading, in source order."""
    with warnings.catch_warnings():  # invalid escape sequences in old modules
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    parts: list[str] = []

    def visit(node, qualname: str) -> None:
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"# {qualname}\n\n{doc}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return "\n\n".join(parts)


def corpus_documents(max_bytes: int = DEFAULT_MAX_BYTES, root: str | os.PathLike | None = None) -> Iterator[dict]:
    """``{"text", "source"}`` records, in order, until the next one would pass ``max_bytes`` of UTF-8 text."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    total = 0
    for i, path in enumerate(stdlib_modules(root)):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            docs = module_docstrings(source, rel[:-3].replace("/", ".").removesuffix(".__init__"))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        records = [{"text": docs, "source": f"stdlib/{rel}#docstrings"}] if docs else []
        if i % SOURCE_EVERY == 0 and len(source.encode("utf-8")) <= MAX_SOURCE_BYTES and source.strip():
            records.append({"text": source, "source": f"stdlib/{rel}"})
        for record in records:
            size = len(record["text"].encode("utf-8"))
            if total + size > max_bytes:
                return
            total += size
            yield record


def write_embedded_corpus(out: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Writes the corpus to ``out`` (jsonl, one document a line) atomically; returns the path."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes: must be a positive integer, got {max_bytes!r}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out: {out} is a directory; give a file name such as {out / 'corpus.jsonl'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in corpus_documents(max_bytes):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
