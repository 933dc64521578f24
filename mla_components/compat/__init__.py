"""Everything that adapts third-party internals, in one place. Each module here names the exact upstream release
it was written against (``UPSTREAM``: distribution -> version) and the upstream objects whose code it relies on
(``RELIES_ON``: dotted path -> SHA-256 of their source, :func:`source_sha256`); tests/test_compat.py fails when an
installed version or one of those sources changes, so a dependency bump shows which patch to re-read.

Modules import nothing else of this project, so any layer may use them:

- :mod:`~mla_components.compat.torchtune`: Torchtune 0.6.1's distributed recipes on CPU-only machines (with
  ``_cpu_site/sitecustomize.py``), torchrun workers that die with their launcher, and ``KVCache`` decode steps
  that CUDA graphs can capture;
- :mod:`~mla_components.compat.triton_interpreter`: Triton 3.6.0's interpreter with NumPy >= 2.4;
- :mod:`~mla_components.compat.lm_eval`: Torchtune's ``eleuther_eval`` recipe with lm-eval 0.4.8, offline and
  with transformers 5.
"""

import hashlib
import importlib
import inspect
import textwrap
from pathlib import Path

TORCHTUNE_RECIPE = "torchtune-recipe:"  # RELIES_ON prefix: a file of the torchtune wheel's top-level recipes/


def resolve(path: str) -> object:
    """The object at a dotted ``path`` (a module, then attributes), e.g.
    ``torchtune.training.memory.get_memory_stats``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def source_sha256(obj: object) -> str:
    """SHA-256 of an object's source (dedented), the fingerprint a patch records of the upstream code it adapts."""
    return hashlib.sha256(textwrap.dedent(inspect.getsource(obj)).encode()).hexdigest()


def fingerprint(path: str) -> str:
    """:func:`source_sha256` of the object at ``path``, or of a Torchtune recipe file (``torchtune-recipe:<name>``;
    the wheel's ``recipes`` package raises on import, so recipes are read as files)."""
    if path.startswith(TORCHTUNE_RECIPE):
        return hashlib.sha256(torchtune_recipe_file(path.removeprefix(TORCHTUNE_RECIPE)).read_bytes()).hexdigest()
    return source_sha256(resolve(path))


def torchtune_recipe_file(name: str) -> Path:
    """The file of one of Torchtune's built-in recipes, e.g. ``generate.py`` (the wheel installs them as a top-level
    ``recipes`` package, which raises on import and which a project's own ``recipes/`` directory can shadow)."""
    import torchtune

    return Path(torchtune.__file__).parent.parent / "recipes" / name
