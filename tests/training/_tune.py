"""Run Torchtune's own recipes the way users do (``tune run ...``) and read what they log."""

import os
import subprocess
import sys
from pathlib import Path

from mla_components.compat.torchtune import cpu_env
from mla_components.tracking import logged_metrics  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).with_name("tune"))
# 2 ranks on a 2-core machine: one thread each; W&B offline; Torchtune's CPU fallbacks (as `mla-tune run` sets)
ENV = cpu_env({**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def tune_command(recipe: str, config: str, *overrides: str, nproc: int | None = None) -> list[str]:
    launcher = ["--nproc_per_node", str(nproc)] if nproc else []
    return [TUNE, "run", *launcher, recipe, "--config", str(REPO / "configs" / config), *overrides]


def tune_run(recipe: str, config: str, *overrides: str, nproc: int | None = None, timeout: int = 600):
    """Run to completion; on failure the assertion shows the end of the output."""
    proc = subprocess.run(
        tune_command(recipe, config, *overrides, nproc=nproc),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"tune run {recipe} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
