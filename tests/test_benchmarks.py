"""The scripts in benchmarks/ (not installed) run from any directory against the installed packages, and find the
configs they launch through the installed ``mla_recipes.configs``, never through the checkout's path."""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_moved_benchmarks_are_here_and_not_in_the_packages():
    names = {p.stem for p in SCRIPTS}
    assert {"benchmark_mla", "benchmark_decode_e2e", "train_benchmark", "passkey_study", "kv_cache_report"} <= names
    root = BENCHMARKS.parent
    for gone in ("mla_kernels/benchmark_mla.py", "mla_kernels/benchmark_decode_e2e.py",
                 "mla_components/train_benchmark.py", "mla_components/evaluation/passkey_study.py"):  # fmt: skip
        assert not (root / gone).exists(), gone


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_benchmark_finds_files_through_its_own_path(script):
    """``Path(__file__)`` would point into the checkout (or nowhere in a copied script)."""
    tree = ast.parse(script.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "__file__" not in names, f"{script.name}: use importlib.resources on mla_recipes.configs"


@pytest.mark.parametrize("name", ["train_benchmark", "passkey_study"])
def test_launched_configs_resolve_in_the_installed_package(name):
    module = _load(BENCHMARKS / f"{name}.py")
    for model in ("mla_tiny", "gqa_tiny"):
        assert (module.CONFIGS / model / "sft_distributed.yaml").is_file()
    assert (module.CONFIGS / "mla_tiny" / "passkey_long_context.yaml").is_file()


def test_kv_cache_report_runs_from_another_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kv_cache_report.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mla_1b_fp8" in proc.stdout and "18,432" in proc.stdout


def test_host_python_benchmark_runs_without_a_gpu(tmp_path):
    """``benchmark_mla.py --host-python``: all Python of an ``mla_decode`` call (driver stubbed), per shape."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "benchmark_mla.py"), "--host-python", "--repeats", "2", "--json", "h.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "h.json").read_text())["host_python"]
    assert [(r["batch"], r["length"]) for r in rows] == [(1, 256), (1, 4096)]
    assert all(0 < r["around_launches_us"] < r["python_us"] < 10_000 for r in rows)
