"""The scripts of ``tools/`` as modules, for the tests that call their functions."""

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """``tools/<name>.py`` imported as ``name``: registered in ``sys.modules`` (its dataclasses look their module up),
    with ``tools/`` on the path (a tool imports its siblings, e.g. bench_loop imports bench_train)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
