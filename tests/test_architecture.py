"""The layer rule of docs/architecture.md, checked on every import in segtrain/ (module level and inside functions).

A module may import from its own package and from lower layers only; the layers below are the document's table.
The tests follow one rule too: no file in tests/ imports a test file (shared helpers live in helper modules).
"""

import ast
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"segtrain.errors", "segtrain.lazy", "segtrain.plotting", "segtrain.progress"},
    {"segtrain.policy", "segtrain.loss", "segtrain.compat", "segtrain.kernels", "segtrain.userfiles"},
    {"segtrain.attention"},
    {"segtrain.config"},
    {"segtrain.models", "segtrain.data"},
    {"segtrain.parallel", "segtrain.speed"},
    {"segtrain.checkpoint"},
    {"segtrain.train", "segtrain.inference"},
    {"segtrain.eval", "segtrain.calibrate"},
    {"segtrain.cli", "segtrain.convert", "segtrain.demo", "segtrain"},
    {"segtrain.__main__"},
]


def unit(module: str) -> str:
    """The layer unit a module belongs to: its top-level package or module under segtrain."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer(module: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{module}: not in any layer of docs/architecture.md; add it there and here")


def exists(unit_name: str) -> bool:
    rel = Path(*unit_name.split(".")[1:])
    return unit_name == "segtrain" or (ROOT / "segtrain" / rel).with_suffix(".py").is_file() or (ROOT / "segtrain" / rel).is_dir()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["segtrain", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, name: str):
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module
                yield from (f"{node.module}.{a.name}" for a in node.names)  # `from segtrain import x`


def test_every_import_goes_down_the_layers():
    files = [*sorted((ROOT / "segtrain").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py"))]
    wrong = []
    for path in files:
        name = module_name(path)
        for target in imports(path, name):
            if not target.startswith("segtrain.") or unit(target) == unit(name):
                continue
            if not exists(unit(target)):  # `from segtrain import __version__`: an attribute, not a module
                continue
            if layer(target) >= layer(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(sorted(set(wrong)))


TESTS = ROOT / "tests"


def imported_test_modules(tree: ast.AST, test_modules: set[str], own: str) -> list[str]:
    """``line N: <the import>`` for every import (module level or inside a function) that names a test module other
    than ``own``: ``import test_x``, ``from test_x import y``, ``from tests.test_x import y``, ``from tests import test_x``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or "", *(f"{node.module or ''}.{a.name}" for a in node.names)]
        else:
            continue
        if any(part in test_modules and part != own for m in modules for part in m.split(".")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_test_import_scan_finds_what_it_looks_for():
    modules = {"test_a", "test_b"}
    code = "import test_b\nfrom test_b import f\nimport tests.test_b as t\nfrom tests import test_b\nfrom . import test_b\n"
    code += "def g():\n    from test_b import h\n"
    assert len(imported_test_modules(ast.parse(code), modules, "test_a")) == 6
    allowed = "import test_a\nfrom tiny_models import make_model\nimport test_c\nfrom testing import x\n"
    allowed += "code = 'import test_b as t'\n"  # a child process's source is a string, not an import
    assert imported_test_modules(ast.parse(allowed), modules, "test_a") == []


def test_no_test_file_imports_another():
    """Shared helpers live in tests/conftest.py or helper modules (tests/tiny_models.py ...), never in a test file: an
    imported test file brings its fixtures and module-level skips along, and ties files that should change alone."""
    files = sorted(TESTS.glob("*.py"))
    test_modules = {path.stem for path in files if path.stem.startswith("test_")}
    wrong = []
    for path in files:
        for hit in imported_test_modules(ast.parse(path.read_text()), test_modules, path.stem):
            wrong.append(f"tests/{path.name} {hit}")
    assert not wrong, "test files import other test files (move the helper to tests/conftest.py or a helper module):\n" + (
        "\n".join(wrong)
    )


MAX_FUNCTION_LINES = 80  # a function a reader holds at once; config validation has its own, smaller bound
MAX_VALIDATE_LINES = 60


def _long_functions(root: Path, limit: int) -> list[str]:
    """``file:line name (N lines)`` for every function or method under ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if any(part == "kernels" for part in path.relative_to(root).parts):  # the link to ../kernels: Triton code
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_library_function_is_over_80_lines(tmp_path):
    too_long = _long_functions(ROOT / "segtrain", MAX_FUNCTION_LINES)
    assert not too_long, "split these functions (at most 80 lines each):\n" + "\n".join(too_long)
    # the scan itself: a long function in a scratch package is found
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert [s.split()[1] for s in _long_functions(tmp_path / "pkg", MAX_FUNCTION_LINES)] == ["f"]


def test_train_config_validate_is_at_most_60_lines():
    from segtrain.train.config import validate

    lines = len(inspect.getsource(validate).splitlines())
    assert lines <= MAX_VALIDATE_LINES, f"segtrain/train/config.py validate: {lines} lines (at most {MAX_VALIDATE_LINES})"
