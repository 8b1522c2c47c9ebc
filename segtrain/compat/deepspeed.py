"""DeepSpeed workarounds (checked with 0.19.8).

1. :func:`consolidated_state_dict`: ZeRO-3 parameters are partitioned over ranks; the engine's
   ``_zero3_consolidated_16bit_state_dict`` (private) gathers them on rank 0 for the final export.
"""

from __future__ import annotations

from segtrain.compat import warn_if_untested

__all__ = ["TESTED", "check_version", "consolidated_state_dict"]

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
