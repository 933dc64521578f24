"""The one ``kernel_backend`` policy: which implementation each op of the model runs.

``kernel_backend`` is one of :data:`KERNEL_BACKENDS`; what it means per op:

- ``torch``: Torchtune's RMSNorm and the PyTorch decoupled RoPE; cached decode in PyTorch
  (:func:`mla_components.modules.attention.absorbed_attention_torch`).
- ``triton``: the Triton RMSNorm and RoPE (forward and backward, so training too); cached decode through the
  Triton flash-decode kernel (on CUDA, or on CPU under ``TRITON_INTERPRET=1``; an error elsewhere).
- ``auto``: Torchtune's RMSNorm and the PyTorch RoPE; cached decode through the Triton kernel on CUDA when Triton
  imports, PyTorch elsewhere.

``auto`` keeps PyTorch for RMSNorm/RoPE because the classes are chosen when the model is built, usually on the
meta device, before the device is known; the decode kernel is chosen per model when its caches are set up
(:func:`resolve_backend`, called by ``MultiHeadLatentAttention.setup_cache``), where the device is known. Both are
resolved once, never per step.
"""

import functools
import importlib.util
import os

import torch
from torch import nn

KERNEL_BACKENDS = ("torch", "triton", "auto")


def validate_kernel_backend(name: str) -> None:
    """Raise ``ValueError`` naming the field when ``name`` is not one of :data:`KERNEL_BACKENDS`."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {name!r}")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional dependency on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as missing
        return False
    return True


def triton_interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete decode backend (``"torch"`` or ``"triton"``) for caches on ``device``.

    ``auto`` picks Triton on CUDA devices when Triton imports and PyTorch elsewhere (CPU, MPS, no Triton).
    ``triton`` is honoured on CUDA, and on CPU only under ``TRITON_INTERPRET=1``.

    Raises:
        ValueError: ``name`` is not one of ``torch``, ``triton``, ``auto``.
        RuntimeError: ``triton`` was requested but Triton is not installed, or the device cannot run it.
    """
    validate_kernel_backend(name)
    if name == "torch":
        return "torch"
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "kernel_backend='triton' needs the triton package: pip install 'infinitecontext[triton]' "
            "(or use kernel_backend='auto' / 'torch')"
        )
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
        return "triton"
    raise RuntimeError(
        f"kernel_backend='triton' cannot run on {device.type} tensors: use a CUDA device, set TRITON_INTERPRET=1 "
        "for CPU tests, or use kernel_backend='auto' / 'torch'"
    )


def norm_and_rope_classes(kernel_backend: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The RMSNorm and decoupled-RoPE classes for a ``kernel_backend``: the Triton ones (same parameters and
    numerics, forward and backward kernels, so training uses them too) with ``"triton"``, Torchtune's otherwise
    (``"auto"`` included: see the module docstring)."""
    validate_kernel_backend(kernel_backend)
    from mla_components.modules.rope import DecoupledRotaryEmbedding

    if kernel_backend != "triton":
        from torchtune.modules import RMSNorm

        return RMSNorm, DecoupledRotaryEmbedding
    from mla_components.compat.triton_interpreter import fix_interpreter_scalars

    fix_interpreter_scalars()  # on CPU (TRITON_INTERPRET=1) only
    from mla_components.modules.triton_layers import (  # imports Triton only for this backend
        TritonDecoupledRotaryEmbedding,
        TritonRMSNorm,
    )

    return TritonRMSNorm, TritonDecoupledRotaryEmbedding
