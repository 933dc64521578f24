"""Session-wide test set-up.

Kernel tests run natively on CUDA, or on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET=1`` must be
set before any ``@triton.jit`` function is defined (Triton decides at decoration time), and other test folders
import the model (hence the kernels) during collection, so it is set here, in the root conftest, which pytest
loads first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_scalars_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter calls ``int()`` on 1-element arrays (loop bounds, ``range``), which NumPy >= 2.4
    rejects (triton-lang/triton#9171, fixed upstream by #9172 after 3.6.0). Apply the same one-line fix."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the kernel tests skip
        return
    if getattr(interpreter._patch_lang_tensor, "_scalar_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_fix = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_scalars_for_numpy_2_4()
