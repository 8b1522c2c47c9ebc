"""DeepSpeed workarounds (checked with 0.19.8).

1. :func:`consolidated_state_dict`: ZeRO-3 parameters are partitioned over ranks; the engine's
   ``_zero3_consolidated_16bit_state_dict`` (private) gathers them on rank 0 for the final export.
2. :func:`skip_cpu_comm_op`: on the CPU accelerator, DeepSpeed's communication backend JIT-builds a
   shared-memory all-reduce op (``deepspeed_shm_comm``) at start-up. Only DeepSpeed-inference's tensor
   parallelism uses it (``inference_all_reduce``; everything else, and that too without the op, goes
   through torch.distributed), and a build killed half way leaves a lock in the shared torch-extensions
   cache on which every later start waits forever, silently. We mark the op incompatible in the table
   DeepSpeed keeps for that (``deepspeed.ops.__compatible_ops__``), so nothing is built.
3. :func:`clear_stale_build_locks`: the ops DeepSpeed does build (``cpu_adam`` for optimizer offload)
   lock their folder with torch's ``FileBaton``, which waits forever on the lock of a killed build.
   A lock file that no process on this machine holds open is such a leftover: removed, with a warning.
4. :func:`deepspeed_logger`: DeepSpeed prints its warnings to stdout through a handler of its own; training
   moves them to the run's log file (:mod:`segtrain.train.library_log`).
5. :func:`optimizer_keeps_grad_norm`: ``engine.get_global_grad_norm()`` is the norm before clipping where
   the optimizer keeps one (ZeRO 1-3); under ZeRO-0 it is None (the engine's clip computes the norm and drops it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from segtrain.compat import warn_if_untested

__all__ = [
    "TESTED",
    "check_version",
    "clear_stale_build_locks",
    "consolidated_state_dict",
    "deepspeed_logger",
    "optimizer_keeps_grad_norm",
    "skip_cpu_comm_op",
]

TESTED = ("0.19.",)


def check_version() -> bool:
    import deepspeed

    return warn_if_untested("deepspeed", deepspeed.__version__, TESTED)


def consolidated_state_dict(engine) -> dict:
    """The whole module's state dict on rank 0 (other ranks get an empty dict), whatever the ZeRO stage."""
    if engine.zero_optimization_stage() != 3:
        return engine.module.state_dict()
    check_version()
    return engine._zero3_consolidated_16bit_state_dict()


def skip_cpu_comm_op() -> None:
    """Before DeepSpeed's communication backend starts on the CPU accelerator: do not build its shm all-reduce op."""
    check_version()
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def extension_roots() -> list[Path]:
    """Where torch's JIT extensions (DeepSpeed's ops) are built: ``TORCH_EXTENSIONS_DIR``, else torch's default root
    (one folder per Python/accelerator pair under it)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(get_default_build_root())
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def _open_files() -> set[str]:
    """Every file a process on this machine that we may inspect holds open (Linux ``/proc``)."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                held.add(os.readlink(fd))
        except OSError:  # the process ended, or is not ours to inspect
            continue
    return held


def clear_stale_build_locks(roots: list[Path] | None = None) -> list[Path]:
    """Remove build locks (``<root>/<op>/lock``) that no process here holds open: a killed build's leftovers.

    Call once per machine (local rank 0) before DeepSpeed builds anything; returns the removed files."""
    locks = [lock for root in (extension_roots() if roots is None else roots) for lock in root.glob("*/lock")]
    if not locks or not Path("/proc/self/fd").is_dir():
        return []
    held = _open_files()
    removed = []
    for lock in locks:
        if os.path.realpath(lock) not in held:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"segtrain: removed {lock}: a build of DeepSpeed's {lock.parent.name} op was killed half way "
                  "and no process holds its lock (it would have waited forever)", file=sys.stderr)  # fmt: skip
    return removed


def deepspeed_logger():
    """DeepSpeed's logger ("DeepSpeed"): on import its module gives it a handler that prints WARNING and up to stdout and
    turns propagation off, so it is imported before its handlers are replaced (:mod:`segtrain.train.library_log`)."""
    from deepspeed.utils import logger

    return logger


def optimizer_keeps_grad_norm(engine) -> bool:
    """Whether ``engine.get_global_grad_norm()`` gives each step's global gradient norm before clipping.

    ZeRO 1 and 2 (and the BF16 optimizer) compute it in the optimizer's step before clipping: TP-split parameters
    (``tensor_model_parallel``) counted on every TP rank, the others on TP rank 0, summed over the model-parallel
    group and the ZeRO partitions; ZeRO-3 likewise over its partitions. ZeRO-0 with a torch optimizer keeps none.
    (``zero_optimization.compute_grad_norm: false`` turns it off for ZeRO 1-2: the log then shows null.)"""
    check_version()
    return engine.zero_optimization_stage() > 0
