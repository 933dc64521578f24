"""Kernel tests: the device they run on (``TRITON_INTERPRET=1`` on CPU is set in ``tests/conftest.py``)."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.fixture
def poisoned(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` return NaN floats and -1 ints during the test, so kernel outputs,
    gradients and scratch that a kernel fails to write show up as NaN or wrong values."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: _poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: _poison(empty_like(*args, **kwargs)))
