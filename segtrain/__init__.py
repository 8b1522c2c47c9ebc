"""segtrain: training and inference with the same segment-wise forward (see DESIGN.md)."""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _SourceKernels(importlib.abc.MetaPathFinder):
    """``segtrain.kernels`` from a source checkout: ``kernels/`` sits beside ``segtrain/`` and an install maps it
    (pyproject's package-dir); with the repository root on PYTHONPATH nothing would, so this does the same."""

    def __init__(self, path: str):
        self.path = path

    def find_spec(self, name, path=None, target=None):
        if name != "segtrain.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(self.path, "__init__.py"), submodule_search_locations=[self.path]
        )


_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_kernels = os.path.join(_root, "kernels")
_checkout = os.path.isfile(os.path.join(_root, "pyproject.toml")) and os.path.isfile(os.path.join(_kernels, "__init__.py"))
if _checkout and not any(isinstance(f, _SourceKernels) for f in sys.meta_path):  # never in site-packages
    sys.meta_path.insert(0, _SourceKernels(_kernels))
