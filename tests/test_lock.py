"""requirements.lock pins the whole CPU install; it must agree with the ranges in requirements*.txt and pyproject."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REFRESH = "requirements.lock is stale: refresh it with tools/lock.sh (its header says how it pins)"


def _lock() -> tuple[dict[str, str], set[str]]:
    """The lock's ``name==version`` pins and the packages it leaves unpinned on purpose (torch: see its header)."""
    text = (ROOT / "requirements.lock").read_text()
    pins = {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}
    unsafe = text.split("# The following packages are considered to be unsafe in a requirements file:")[-1]
    unpinned = {canonicalize_name(n) for n in re.findall(r"^# ([A-Za-z0-9_.-]+)$", unsafe, re.M)}
    return pins, unpinned


def _requirements(path: Path) -> list[Requirement]:
    lines = (re.sub(r"\s+#.*", "", line).strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def test_lock_pins_every_requirement_within_its_range():
    pins, unpinned = _lock()
    assert unpinned == {"torch"}, REFRESH
    for req in _requirements(ROOT / "requirements.txt") + _requirements(ROOT / "requirements-dev.txt"):
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"{req.name} is required but not in the lock. {REFRESH}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}. {REFRESH}"


def test_lock_pins_exact_versions_only():
    body = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith((" ", "#"))]
    loose = [line for line in body if not re.fullmatch(r"[A-Za-z0-9_.-]+==\S+( ; .+)?", line)]
    assert not loose, f"not pinned to one version: {loose}. {REFRESH}"


def test_ci_and_readme_install_from_the_lock_with_the_torch_the_lock_was_made_with():
    header = (ROOT / "requirements.lock").read_text().split("\n\n")[0]
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    torch = re.search(r"torch==([0-9.]+)", ci)[1]
    assert "-r requirements.lock" in ci and "-r requirements.lock" in readme
    assert f"torch=={torch}" in readme
    assert Requirement(next(str(r) for r in _requirements(ROOT / "requirements.txt") if r.name == "torch")).specifier.contains(
        torch
    )
    assert "tools/lock.sh" in header


def test_pyproject_ranges_admit_the_locked_versions():
    """Users who install into their own environment get pyproject's ranges; the locked versions must lie inside them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins, _ = _lock()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"pyproject: {req} excludes the locked {pins[name]}"
