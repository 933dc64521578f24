"""Let Torchtune 0.6.1's distributed recipes run unmodified on a CPU-only machine (gloo), for tests and demos.

Targets torchtune==0.6.1 exactly (pinned in pyproject.toml; its last release): ``RELIES_ON`` fingerprints the
functions and the recipe file this adapts.

The recipes assume CUDA in three places, all outside the training math:

- ``full_dpo_distributed`` calls ``init_process_group("cuda:nccl,cpu:gloo")``, which fails on a build without NCCL;
  here a backend string naming NCCL falls back to its gloo part when NCCL is unavailable.
- rank 0 calls ``training.get_memory_stats(device)`` unconditionally, which raises for CPU devices; here it reports
  the process's peak resident memory instead.
- ``training.cleanup_before_training()`` calls ``torch.cpu.empty_cache()`` and ``reset_peak_memory_stats()``,
  which torch does not have; here they are no-ops.

Nothing changes where CUDA is available. ``end_with_launcher()`` (on every machine) makes each torchrun worker die
with its launcher. Both run in every process of a ``tune run`` launched by ``mla-tune run`` (which puts
``_cpu_site/`` with a ``sitecustomize.py`` on ``PYTHONPATH``; so do the tests and the SLURM launcher's CPU mode):
torchrun's workers are fresh interpreters, and the DPO recipe binds ``init_process_group`` at import, so the patch
must be in place before the recipe module loads.

Separately, :func:`kv_cache_without_host_check` lets a decode step through Torchtune's ``KVCache`` be captured in a
CUDA graph (``mla_components.decoding``), and :func:`upstream_recipe` with :func:`next_token_hook` let a recipe
reuse Torchtune's ``generate`` recipe with its decode steps replaced (``mla_recipes/generate.py``).
"""

import ctypes
import importlib.util
import os
import resource
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

UPSTREAM = {"torchtune": "0.6.1"}
RELIES_ON = {
    # wrapped for CPU devices: its signature and its CUDA-only body
    "torchtune.training.memory.get_memory_stats": "8e3ff667fd45736802d51fd799d0d13e00802ca307f4d69633e4e611a11aef1f",
    # calls torch.cpu.empty_cache / reset_peak_memory_stats, which torch lacks
    "torchtune.training.memory.cleanup_before_training": (
        "215cb883121ed469d35b64b6f862c20feaa2be0272bca20e341a6d77f58ef138"
    ),
    # binds init_process_group at import and calls it with "cuda:nccl,cpu:gloo"
    "torchtune-recipe:full_dpo_distributed.py": "9419fb45f8bbbe82243dc64bc628a3024ccd2caf787b2db869514a5e465ab651",
    # calls generation.generate (a module global) with custom_generate_next_token=None unless quantized
    "torchtune-recipe:generate.py": "a8ab2382be3665fa7d19706bb27ea4fbea1578a3ad5edeb1aa8aa465b8c7609a",
    # asserts the fill level on the host; replaced while a decode step is captured in a CUDA graph
    "torchtune.modules.kv_cache.KVCache.update": "6976bc01b5030601da22121c254f349529295a403fd9c9ef52a66c12111995f1",
}
SITE_DIR = Path(__file__).with_name("_cpu_site")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def apply() -> bool:
    """Install the CPU fallbacks; returns False (and changes nothing) when CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return False
    import torch.distributed as dist
    from torchtune import training
    from torchtune.training import memory

    for name in ("empty_cache", "reset_peak_memory_stats"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *args, **kwargs: None)

    get_memory_stats = memory.get_memory_stats

    def cpu_aware_memory_stats(device: torch.device, reset_stats: bool = True) -> dict:
        if torch.device(device).type != "cpu":
            return get_memory_stats(device, reset_stats)
        peak = _peak_rss_gib()
        return {"peak_memory_active": peak, "peak_memory_alloc": peak, "peak_memory_reserved": peak}

    cpu_aware_memory_stats.__wrapped__ = get_memory_stats  # the RELIES_ON fingerprint reads the upstream one
    training.get_memory_stats = memory.get_memory_stats = cpu_aware_memory_stats

    init_process_group = dist.init_process_group

    def init_without_nccl(backend=None, *args, **kwargs):
        if isinstance(backend, str) and "nccl" in backend and not dist.is_nccl_available():
            backend = "gloo"
        return init_process_group(backend, *args, **kwargs)

    dist.init_process_group = init_without_nccl
    return True


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ``os.environ``) with ``_cpu_site/`` prepended to ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def end_with_launcher() -> bool:
    """In a worker started by ``torchrun`` (``TORCHELASTIC_RUN_ID`` set), have Linux SIGKILL this process when the
    launcher dies. torchrun starts its workers in sessions of their own, so killing the launcher's process group
    (as users and schedulers do) would otherwise leave them training and writing. Returns whether it is armed."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


@contextmanager
def kv_cache_without_host_check() -> Iterator[None]:
    """Within the block, Torchtune's ``KVCache.update`` writes and advances the cache without its
    ``assert cache_pos[0] + seq_len <= max_seq_len``: that reads a device tensor on the host, which CUDA-graph
    capture forbids. Callers check the cache's capacity on the host before decoding (``mla_components.decoding``).
    Process-wide while active: use it around a capture only."""
    from torchtune.modules.kv_cache import KVCache

    upstream = KVCache.update

    def update(self, k_val, v_val):
        if k_val.shape[0] > self.k_cache.shape[0]:
            return upstream(self, k_val, v_val)  # upstream's ValueError, raised before its assert
        positions = self.cache_pos[: k_val.shape[2]]
        self.k_cache[:, :, positions] = k_val
        self.v_cache[:, :, positions] = v_val
        self.cache_pos.add_(k_val.shape[2])
        return self.k_cache, self.v_cache

    KVCache.update = update
    try:
        yield
    finally:
        KVCache.update = upstream


def upstream_recipe(name: str) -> ModuleType:
    """Torchtune's built-in recipe ``recipes/<name>`` (e.g. ``generate.py``) loaded from its file as a module of its
    own, ``torchtune_recipes.<stem>``, so that a recipe of this project can subclass its recipe class."""
    from mla_components.compat import torchtune_recipe_file

    module_name = f"torchtune_recipes.{Path(name).stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, torchtune_recipe_file(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def next_token_hook(recipe_module: ModuleType, make_step: Any) -> Iterator[None]:
    """Within the block, every ``generation.generate(model=..., custom_generate_next_token=None, ...)`` call of
    ``recipe_module`` (Torchtune's ``generate`` recipe calls it with None unless the model is quantized) decodes
    through ``make_step(model)``, a function with ``generate_next_token``'s signature. The recipe module's global
    ``generation`` is swapped for the block; Torchtune's ``generation`` module itself is left alone."""
    upstream = recipe_module.generation

    def generate(*args: Any, **kwargs: Any):
        if kwargs.get("custom_generate_next_token") is None:
            kwargs["custom_generate_next_token"] = make_step(kwargs["model"])
        return upstream.generate(*args, **kwargs)

    recipe_module.generation = SimpleNamespace(**{**vars(upstream), "generate": generate})
    try:
        yield
    finally:
        recipe_module.generation = upstream
