"""The layer rule of docs/architecture.md, checked on every import in segtrain/ (module level and inside functions).

A module may import from its own package and from lower layers only; the layers below are the document's table.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"segtrain.errors", "segtrain.lazy", "segtrain.progress"},
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
