"""The Kubernetes manifests: rendered by Kustomize, schema-valid for a pinned Kubernetes, checkov-clean, linted,
and carrying what serving an MLA model on GPUs needs. The live checks (metrics, Prometheus, PromQL) are in
tests/serving."""

import itertools
import json
import re
import subprocess

import pytest
import yaml

from tests._requirements import require_tool
from tests.k8s.manifests import (
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    REPO,
    adapter_rules,
    configmap_file,
    dashboard_queries,
    find,
    hpa_metric_names,
    localhost_scrape_config,
    objects,
    render,
)

OPS = REPO / ".venv-ops" / "bin"
OPS_HINT = "the ops virtualenv .venv-ops (kubernetes-validate, checkov, yamllint) is not installed"
# Custom resources (no schema in kubernetes-validate's bundle) would be listed here and checked separately; the
# stack uses none (prometheus-adapter reads a ConfigMap; RuntimeClass is node.k8s.io/v1).
CUSTOM_RESOURCE_KINDS: set[str] = set()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param


@pytest.fixture(scope="module")
def rendered_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rendered")
    for name in OVERLAYS:
        (out / f"{name}.yaml").write_text(render(name))
    return out


def test_every_object_validates_strictly_against_pinned_kubernetes(rendered_dir):
    tool = require_tool(OPS / "kubernetes-validate", OPS_HINT)
    for name, version in itertools.product(OVERLAYS, KUBERNETES_VERSIONS):
        objs = objects(name)
        assert not {o["kind"] for o in objs} & CUSTOM_RESOURCE_KINDS
        result = subprocess.run(
            [tool, "--strict", "-k", version, str(rendered_dir / f"{name}.yaml")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        passed = re.findall(r"passed for resource (\S+) against version", result.stdout + result.stderr)
        expected = sorted(f"{o['kind'].lower()}/{o['metadata']['name']}" for o in objs)
        assert sorted(passed) == expected, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    """The validator is not a no-op: a misspelt container field fails."""
    tool = require_tool(OPS / "kubernetes-validate", OPS_HINT)
    deployment = find(objects("k3s"), "Deployment", "vllm")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    result = subprocess.run(
        [tool, "--strict", "-k", KUBERNETES_VERSIONS[-1], str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "startupProbes" in result.stdout + result.stderr


def test_checkov_passes_with_only_justified_skips(rendered_dir):
    tool = require_tool(OPS / "checkov", OPS_HINT)
    result = subprocess.run(
        [tool, "-d", str(rendered_dir), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads(result.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] > 100
    for skipped in results["skipped_checks"]:  # every inline skip says why
        assert len(skipped["check_result"].get("suppress_comment") or "") > 20, skipped["check_id"]
    assert {s["check_id"] for s in results["skipped_checks"]} == {"CKV_K8S_38", "CKV_K8S_43"}


def test_yamllint_is_clean():
    tool = require_tool(OPS / "yamllint", OPS_HINT)
    result = subprocess.run(
        [tool, "-c", str(K8S / ".yamllint"), "--strict", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_shipped_scrape_config_loads_in_prometheus(tmp_path):
    """promtool checks the shipped scrape configuration as tests/serving runs it (Debian's Prometheus is built
    without Kubernetes service discovery, so the discovery block is swapped for a static target there)."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    objs = objects("k3s")
    shipped = yaml.safe_load(configmap_file(objs, "prometheus-config", "prometheus.yml"))
    jobs = {job["job_name"] for job in shipped["scrape_configs"]}
    assert jobs == {"vllm", "dcgm-exporter", "host-node-exporter", "host-dcgm-exporter"}
    config = localhost_scrape_config(objs, dict.fromkeys(jobs, "127.0.0.1:8000"), "vllm-0")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pod_spec(objs, kind, name):
    return find(objs, kind, name)["spec"]["template"]["spec"]


def test_vllm_deployment_serves_the_placed_model_on_a_gpu(overlay):
    objs = objects(overlay)
    spec = _pod_spec(objs, "Deployment", "vllm")
    (vllm,) = spec["containers"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"]), vllm["image"]
    # --model is the PVC path where the placement Job puts MODEL_NAME
    model_name = find(objs, "ConfigMap", "model-placement")["data"]["MODEL_NAME"]
    models_mount = next(m for m in vllm["volumeMounts"] if m["name"] == "models")
    assert vllm["args"][0] == f"{models_mount['mountPath']}/{model_name}" and models_mount["readOnly"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    find(objs, "PersistentVolumeClaim", "models")
    # engine arguments come from the ConfigMap file
    config_mount = next(m for m in vllm["volumeMounts"] if m["name"] == "vllm-config")
    assert vllm["args"][1:] == ["--config", f"{config_mount['mountPath']}/config.yaml"]
    assert "served-model-name" in yaml.safe_load(configmap_file(objs, "vllm-config", "config.yaml"))
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shm = next(m for m in vllm["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health", probe
    startup = vllm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load + graph capture
    assert spec["securityContext"]["runAsNonRoot"] and vllm["securityContext"]["readOnlyRootFilesystem"]


def test_k3s_overlay_uses_the_nvidia_runtime_class():
    objs = objects("k3s")
    assert _pod_spec(objs, "Deployment", "vllm")["runtimeClassName"] == "nvidia"
    assert find(objs, "RuntimeClass", "nvidia")["handler"] == "nvidia"
    job_volumes = {v["name"]: v for v in _pod_spec(objs, "Job", "model-placement")["volumes"]}
    assert job_volumes["source"] == {
        "name": "source",
        "persistentVolumeClaim": {"claimName": "model-source", "readOnly": True},
    }
    standard = objects("standard")
    assert "runtimeClassName" not in _pod_spec(standard, "Deployment", "vllm")
    assert find(standard, "PersistentVolumeClaim", "models")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_hpa_scales_on_the_adapter_metric_of_the_vllm_queue(overlay):
    objs = objects(overlay)
    hpa = find(objs, "HorizontalPodAutoscaler", "vllm")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"}
    exposed = {rule["name"]["as"]: rule for rule in adapter_rules(objs)}
    for name in hpa_metric_names(objs):
        assert name in exposed, f"HPA metric {name} is not exposed by any prometheus-adapter rule"
        assert "vllm:num_requests_waiting" in exposed[name]["seriesQuery"]


def test_dashboard_uses_current_vllm_metric_names_and_dcgm():
    queries = " ".join(dashboard_queries(objects("k3s")))
    for current in (
        "vllm:kv_cache_usage_perc",
        "vllm:inter_token_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:num_requests_waiting",
        "DCGM_FI_DEV_GPU_UTIL",
    ):
        assert current in queries, current
    for removed in ("vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"):  # renamed upstream
        assert removed not in queries, removed


@pytest.fixture
def place_script(tmp_path):
    script = tmp_path / "place.sh"
    script.write_text(configmap_file(objects("k3s"), "model-placement-script", "place.sh"))
    return script


def _export_dir(root, name="infinitecontext-1b", files=("config.json", "model.safetensors", "tokenizer.json")):
    model = root / name
    model.mkdir(parents=True)
    for file in files:
        (model / file).write_text(f"contents of {file}")
    return model


def _place(script, tmp_path, **env):
    base = {"PATH": "/usr/bin:/bin", "MODEL_NAME": "infinitecontext-1b", "MODELS_DIR": str(tmp_path / "models")}
    (tmp_path / "models").mkdir(exist_ok=True)
    return subprocess.run(["sh", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_placement_copies_from_the_source_volume_atomically(place_script, tmp_path):
    _export_dir(tmp_path / "source")
    result = _place(place_script, tmp_path, SOURCE_DIR=str(tmp_path / "source"))
    assert result.returncode == 0, result.stderr
    placed = tmp_path / "models" / "infinitecontext-1b"
    assert (placed / "model.safetensors").read_text() == "contents of model.safetensors"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["infinitecontext-1b"]  # no leftovers
    again = _place(place_script, tmp_path, SOURCE_DIR=str(tmp_path / "source"))
    assert again.returncode == 0 and "already present" in again.stdout


def test_placement_downloads_and_checks_the_sha256(place_script, tmp_path):
    _export_dir(tmp_path / "export")
    archive = tmp_path / "model.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path / "export"), "infinitecontext-1b"], check=True)
    digest = subprocess.run(["sha256sum", str(archive)], capture_output=True, text=True).stdout.split()[0]
    env = {"SOURCE_DIR": str(tmp_path / "none"), "MODEL_URL": f"file://{archive}"}

    bad = _place(place_script, tmp_path, **env, MODEL_SHA256="0" * 64)
    assert bad.returncode != 0 and "FAILED" in bad.stderr + bad.stdout
    assert list((tmp_path / "models").iterdir()) == []  # neither the archive nor a partial directory stays

    good = _place(place_script, tmp_path, **env, MODEL_SHA256=digest)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "models" / "infinitecontext-1b" / "config.json").read_text() == "contents of config.json"


def test_placement_refuses_an_incomplete_export(place_script, tmp_path):
    _export_dir(tmp_path / "source", files=("config.json", "model.safetensors"))
    result = _place(place_script, tmp_path, SOURCE_DIR=str(tmp_path / "source"))
    assert result.returncode != 0 and "tokenizer.json missing" in result.stderr
    assert list((tmp_path / "models").iterdir()) == []
