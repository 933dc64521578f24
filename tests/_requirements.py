"""Prerequisites of tests that run real external tools: under CI (``CI`` set, as ``.ci/run`` does, after
``make test`` installed everything) a missing one fails the test; elsewhere it skips with the command that installs
it. Only CUDA-only tests skip everywhere (each kernel also has an interpreter-mode CPU test)."""

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest


def unavailable(message: str) -> None:
    """A missing prerequisite fails under CI (which installs everything) and skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require_tool(path: str | Path, why: str) -> str:
    """The tool's path, or ``unavailable``."""
    found = shutil.which(str(path))
    if found is None:
        unavailable(f"{path} not found: {why}")
    return found


def require_module(name: str, why: str) -> ModuleType:
    """The imported module, or ``unavailable``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"{name} cannot be imported ({e}): {why}")


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root: {why}")
