"""matplotlib for the plots that benchmarks, studies and reports write beside their JSON."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not installed: the JSON and the
    table are the result, the plot is a view of them, so a missing plot never stops a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
