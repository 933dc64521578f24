"""Read the Kubernetes manifests as the cluster will see them (``kubectl kustomize``) and pull out what the
serving tests check against a live vLLM + Prometheus: metric names, PromQL queries, the scrape configuration."""

import copy
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests._requirements import require_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("k3s", "standard")
NAMESPACE = "infinitecontext"
VLLM_METRIC = re.compile(r"vllm:[A-Za-z0-9_:]+")


def k3s_kubernetes_version() -> str:
    """The Kubernetes minor of the K3s release the Ansible role installs (``k3s_version: v1.31.6+k3s1`` ->
    ``1.31.0``, the schema kubernetes-validate bundles for that minor)."""
    defaults = yaml.safe_load((REPO / "ansible" / "roles" / "k3s" / "defaults" / "main.yml").read_text())
    major, minor = re.match(r"v(\d+)\.(\d+)\.", defaults["k3s_version"]).groups()
    return f"{major}.{minor}.0"


# The manifests must validate on the K3s the role installs and on a current standard cluster.
KUBERNETES_VERSIONS = (k3s_kubernetes_version(), "1.33.0")


@cache
def render(overlay: str) -> str:
    """``kubectl kustomize k8s/overlays/<overlay>`` (kubectl's built-in Kustomize v5; no cluster needed)."""
    kubectl = require_tool("kubectl", "kubectl renders the Kustomize overlays (`kubectl kustomize`)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(overlay: str) -> list[dict[str, Any]]:
    return [obj for obj in yaml.safe_load_all(render(overlay)) if obj]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def configmap_file(objs: list[dict[str, Any]], name: str, key: str) -> str:
    return find(objs, "ConfigMap", name)["data"][key]


def adapter_rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return yaml.safe_load(configmap_file(objs, "prometheus-adapter-rules", "config.yaml"))["rules"]


def dashboard(objs: list[dict[str, Any]]) -> dict[str, Any]:
    import json

    return json.loads(configmap_file(objs, "grafana-dashboard-vllm", "vllm-dashboard.json"))


def dashboard_queries(objs: list[dict[str, Any]]) -> list[str]:
    return [target["expr"] for panel in dashboard(objs)["panels"] for target in panel["targets"]]


def adapter_queries(objs: list[dict[str, Any]], pod: str) -> list[str]:
    """Each rule's ``metricsQuery`` as prometheus-adapter sends it when the HPA asks for ``pod`` (Go template
    fields filled the way the adapter fills them for a per-pod metric)."""
    queries = []
    for rule in adapter_rules(objs):
        series = VLLM_METRIC.search(rule["seriesQuery"]).group(0)
        query = rule["metricsQuery"]
        query = query.replace("<<.Series>>", series)
        query = query.replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{pod}"')
        query = query.replace("<<.GroupBy>>", "pod")
        queries.append(query)
    return queries


def hpa_metric_names(objs: list[dict[str, Any]]) -> list[str]:
    hpa = find(objs, "HorizontalPodAutoscaler", "vllm")
    return [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]


def vllm_metric_names(objs: list[dict[str, Any]]) -> set[str]:
    """Every ``vllm:*`` series the HPA (through the adapter rules) and the dashboard read."""
    names = set()
    for rule in adapter_rules(objs):
        names.update(VLLM_METRIC.findall(rule["seriesQuery"]))
    for query in dashboard_queries(objs):
        names.update(VLLM_METRIC.findall(query))
    return names


def discovery_labels(job: str, pod: str) -> dict[str, str]:
    """The ``__meta_kubernetes_*`` labels Kubernetes service discovery would give ``job``'s target (a pod of the
    Deployment / the DCGM exporter's endpoints), so the shipped relabel rules run on them unchanged."""
    if job == "vllm":
        return {
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_service_label_app_kubernetes_io_name": "vllm",
            "__meta_kubernetes_endpoint_port_name": "http",
        }
    if job.startswith("host-"):  # node discovery: the kubelet's address, swapped for the exporter's port
        return {"__meta_kubernetes_node_name": "gpu-node-0"}
    return {
        "__meta_kubernetes_service_label_app_kubernetes_io_name": "dcgm-exporter",
        "__meta_kubernetes_endpoint_port_name": "metrics",
        "__meta_kubernetes_pod_node_name": "gpu-node-0",
    }


def localhost_scrape_config(objs: list[dict[str, Any]], targets: dict[str, str], pod: str) -> dict[str, Any]:
    """The shipped ``prometheus.yml`` with Kubernetes service discovery swapped for static targets.

    ``targets`` maps job name -> ``host:port``; jobs without a target (DCGM: no GPU here) are dropped. Each static
    target carries the discovery labels Kubernetes would have attached (:func:`discovery_labels`), so the shipped
    ``relabel_configs`` (keep rules, the ``namespace``/``pod`` labels the HPA query needs), metrics path, intervals
    and metric relabelling all run exactly as shipped.
    """
    config = copy.deepcopy(yaml.safe_load(configmap_file(objs, "prometheus-config", "prometheus.yml")))
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        assert "kubernetes_sd_configs" in job, job["job_name"]
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [
            {"targets": [targets[job["job_name"]]], "labels": discovery_labels(job["job_name"], pod)}
        ]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config
