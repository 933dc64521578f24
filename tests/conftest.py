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

from mla_components.compat.triton_interpreter import fix_interpreter_scalars  # noqa: E402  (after TRITON_INTERPRET is set)

fix_interpreter_scalars()  # models apply it themselves (kernel_backend="triton"); kernel tests call kernels directly
