"""Every package in the source tree is installed, and kernels/ installs as segtrain.kernels only."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "segtrain").rglob("__init__.py")}
    assert on_disk | {"segtrain.kernels"} == set(tool["packages"])
    assert tool["package-dir"] == {"segtrain.kernels": "kernels"}
    assert "kernels" not in tool["packages"]
