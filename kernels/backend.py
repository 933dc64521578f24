"""Kernel backend selection: ``"torch"`` | ``"triton"`` | ``"auto"`` (Triton on CUDA when it imports)."""

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "auto")


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
    """The concrete backend (``"torch"`` or ``"triton"``) for tensors on ``device``.

    ``auto`` picks Triton on CUDA devices when Triton imports and PyTorch elsewhere (CPU, MPS, no Triton).
    ``triton`` is honoured on CUDA, and on CPU only under ``TRITON_INTERPRET=1``.

    Raises:
        ValueError: ``name`` is not one of ``torch``, ``triton``, ``auto``.
        RuntimeError: ``triton`` was requested but Triton is not installed, or the device cannot run it.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {name!r}")
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
