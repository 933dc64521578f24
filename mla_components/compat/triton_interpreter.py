"""Triton interpreter (``TRITON_INTERPRET=1``, the CPU path of ``kernel_backend="triton"``) fixes for the pinned
Triton.

Targets triton==3.6.0 (pinned in pyproject.toml) with NumPy >= 2.4 (tested with 2.4.6): Triton 3.6's interpreter
calls ``int()`` on 1-element arrays (loop bounds, ``range``), which NumPy 2.4 rejects with ``TypeError: only
0-dimensional arrays can be converted to Python scalars`` (triton-lang/triton#9171, fixed upstream by #9172 after
3.6.0). The patch is that upstream fix: interpreter tensors get an ``__index__`` reading their single element.
"""

import os

UPSTREAM = {"triton": "3.6.0"}
RELIES_ON = {
    # wrapped: the hook that sets interpreter tensors' attributes, called as (tensor, scope)
    "triton.runtime.interpreter._patch_lang_tensor": "efc91e4a5c969e2c7e14b35acb5f4bb9e47290c7a45189eb8840b1b6918d1e9a",
}


def fix_interpreter_scalars() -> bool:
    """Apply the fix when ``TRITON_INTERPRET=1`` and Triton's interpreter has the patched hook; idempotent.
    Returns whether it is in place."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the triton backend refuses to run anyway
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_scalar_fix", False):
        return True

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_fix = True
    patched.__wrapped__ = original  # inspect.getsource (the RELIES_ON fingerprint) reads the upstream function
    interpreter._patch_lang_tensor = patched
    return True
