"""Triton workarounds (checked with 3.6.0 and numpy 2.4).

1. :func:`patch_interpreter_scalars`: Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the tests of
   ``segtrain.kernels``) holds a kernel's scalars as numpy arrays of shape ``(1,)`` and turns a loop bound
   into an int with ``int(array)``, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted").
   The patch takes the one element instead. Compiled kernels on the GPU never go through this code.
"""

from __future__ import annotations

from segtrain.compat import warn_if_untested

__all__ = ["TESTED", "patch_interpreter_scalars"]

TESTED = ("3.6.",)


def patch_interpreter_scalars() -> None:
    """Let the interpreter use a scalar tensor as a loop bound under numpy >= 2.4 (idempotent)."""
    import triton
    import triton.runtime.interpreter as interpreter

    warn_if_untested("triton", triton.__version__, TESTED)
    original = interpreter._patch_lang_tensor
    if getattr(original, "_segtrain_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._segtrain_patched = True
    interpreter._patch_lang_tensor = patched
