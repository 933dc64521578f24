"""Kernel tests: the device they run on (``TRITON_INTERPRET=1`` on CPU is set in ``tests/conftest.py``)."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
