"""Triton's CPU interpreter (``TRITON_INTERPRET=1``: the tests, the self-check on CPU) with any NumPy.

The interpreter holds every scalar as a one-element array and turns it into a Python int with ``int(array)``
wherever Python needs one, e.g. a loop bound that is a kernel argument (``for v0 in range(0, V, BLOCK_V)``).
NumPy 2.4 refuses ``int()`` of an array that has a dimension ("only 0-dimensional arrays can be converted to
Python scalars"); Triton 3.7.1 squeezes the array first. On older interpreters (Triton 3.6, the GPU machine's)
every kernel with a runtime loop bound would die on CPU with NumPy >= 2.4, so ``squeeze_interpreter_scalars``
makes the same change there. Compiled kernels (a GPU) never reach this code: it only touches the interpreter,
and only when the interpreter is on.
"""

from __future__ import annotations

import os


def squeeze_interpreter_scalars() -> None:
    """Make the interpreter's ``tensor.__index__`` squeeze its one-element array (idempotent, interpreter only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "squeezes_scalars", False):
        return

    def patch_tensor_squeezing(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        # set after the interpreter's own: the scope restores both, in reverse order, when the kernel returns
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
