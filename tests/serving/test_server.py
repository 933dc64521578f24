"""`vllm serve` (OpenAI API) on localhost, started once with the k8s ConfigMap's arguments, scraped by a real
Prometheus with the shipped scrape configuration; the HPA's and the dashboard's queries run against it."""

import json
import math
import re
import subprocess
import threading
import time
import urllib.parse

import pytest
import yaml
from torchtune.data import Message

from mla_components.data import byte_tokenizer
from tests.k8s.manifests import adapter_queries, configmap_file, dashboard_queries, vllm_metric_names
from tests.serving.conftest import POD, SERVING, http_json, http_text, vllm_python

pytestmark = pytest.mark.slow  # starts vLLM engines: about a minute each on 2 cores
LOAD = {"requests": 200, "concurrency": 16, "max_tokens": 16}


@pytest.fixture(scope="module")
def model_name(manifests):
    return yaml.safe_load(configmap_file(manifests, "vllm-config", "config.yaml"))["served-model-name"]


@pytest.fixture(scope="module")
def server(vllm_server, prometheus):
    """The vLLM server, with Prometheus already scraping it (so the load below lands in its time series)."""
    return vllm_server


def test_completions(server, model_name):
    prompt = "The passkey is"
    reply = http_json(
        f"{server}/v1/completions",
        {"model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
    )
    assert reply["model"] == model_name
    assert reply["choices"][0]["finish_reason"] == "length"
    # the served tokenizer is ours: the prompt is <bos> + one token per UTF-8 byte
    assert reply["usage"] == {**reply["usage"], "prompt_tokens": 1 + len(prompt.encode()), "completion_tokens": 8}


def test_chat_uses_our_chat_template(server, model_name):
    messages = [{"role": "user", "content": "What is the passkey?"}]
    ours, _ = byte_tokenizer().tokenize_messages(
        [Message("user", messages[0]["content"]), Message("assistant", "")], add_end_tokens=False
    )
    rendered = http_json(
        f"{server}/tokenize", {"model": model_name, "messages": messages, "add_generation_prompt": True}
    )
    assert rendered["tokens"] == ours
    reply = http_json(f"{server}/v1/chat/completions", {"model": model_name, "messages": messages, "max_tokens": 8})
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["prompt_tokens"] == len(ours)


def test_metrics_expose_every_name_the_manifests_use(server, manifests):
    exposed = set(re.findall(r"^(vllm:[A-Za-z0-9_:]+)", http_text(f"{server}/metrics"), flags=re.M))
    used = vllm_metric_names(manifests)
    assert len(used) >= 8, used  # the adapter rule and the dashboard panels were parsed
    assert not used - exposed, f"used by the manifests but not exported by vLLM: {sorted(used - exposed)}"


def test_bounded_load_has_no_errors(server, model_name):
    command = [
        vllm_python(), str(SERVING / "load_test.py"), "--url", server, "--model", model_name,
        "--requests", str(LOAD["requests"]), "--concurrency", str(LOAD["concurrency"]),
        "--max-tokens", str(LOAD["max_tokens"]),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    print("load test:", json.dumps(report))
    assert report["errors"] == 0, report["error_samples"]
    assert report["ok"] == LOAD["requests"]
    assert 0 < report["p50_s"] <= report["p90_s"] <= report["p99_s"]


def _query(prometheus, expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = http_json(url)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _wait_for_series(prometheus, expr, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        result = _query(prometheus, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(2)


def test_prometheus_scrape_feeds_the_hpa_query(server, prometheus, manifests):
    (query,) = adapter_queries(manifests, pod=POD)
    result = _wait_for_series(prometheus, query)
    assert result, f"no series for the HPA's query {query}"
    assert [series["metric"] for series in result] == [{"pod": POD}]
    assert math.isfinite(float(result[0]["value"][1]))


def test_prometheus_answers_every_dashboard_query(server, prometheus, manifests, model_name):
    """Every vLLM panel query returns series; the DCGM panels can't on a machine without a GPU (listed)."""
    queries = dashboard_queries(manifests)
    gpu_only = [q for q in queries if "DCGM_" in q]
    vllm_queries = [q for q in queries if q not in gpu_only]
    assert len(gpu_only) == 2 and len(vllm_queries) >= 8
    # the same load that the previous test sent is counted in the scraped series
    served = _wait_for_series(prometheus, 'sum(vllm:request_success_total{namespace="infinitecontext"}) >= 200')
    assert served, "Prometheus never saw the load test's 200 requests"
    latency_queries = []
    for query in vllm_queries:
        concrete = query.replace("$namespace", "infinitecontext").replace("$__rate_interval", "2m")
        assert _wait_for_series(prometheus, concrete), f"no series for dashboard query {concrete}"
        if "histogram_quantile" in query:
            latency_queries.append(concrete)
    assert len(latency_queries) >= 3  # TTFT, inter-token latency, end-to-end latency
    # Latency panels are rates: NaN unless requests arrive while Prometheus scrapes (the load test above may
    # finish between two scrapes). Send a trickle across several scrape intervals, then every panel shows a value.
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            body = {"model": model_name, "prompt": "The pass key is", "max_tokens": 4, "temperature": 0}
            http_json(f"{server}/v1/completions", body)
            stop.wait(2)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        for concrete in latency_queries:  # `> 0` drops NaN
            assert _wait_for_series(prometheus, f"({concrete}) > 0", timeout=90), f"no latency from {concrete}"
    finally:
        stop.set()
        sender.join(timeout=30)


def test_host_exporter_jobs_scrape_the_ports_ansible_installs(prometheus):
    """Node discovery yields the kubelet address; the shipped relabelling points the host jobs at the node exporter
    (:9100) and DCGM exporter (:9400) that ansible/ runs on each GPU host, labelled with the node's name."""
    deadline = time.monotonic() + 60
    while True:
        active = http_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        host = {t["labels"]["job"]: t for t in active if t["labels"]["job"].startswith("host-")}
        if len(host) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert host["host-node-exporter"]["scrapeUrl"] == "http://127.0.0.1:9100/metrics"
    assert host["host-dcgm-exporter"]["scrapeUrl"] == "http://127.0.0.1:9400/metrics"
    assert {t["labels"]["node"] for t in host.values()} == {"gpu-node-0"}
