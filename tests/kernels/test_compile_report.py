"""The stage-1 kernel as the compiler builds it for an H100/H200, checked on the CPU (``benchmark_mla.py
--compile-report``: Triton's own pipeline down to the cubin, ``cuobjdump`` for the registers). These are the facts
behind two choices of the kernel: the rope key's strides handed over in 16-byte units (``KPE_STRIDE_UNIT``) and
``DecodeConfig.fp8_reload``. No timing: that needs the GPU (docs/results/kernels.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._requirements import require_module

require_module("triton", 'pip install -e ".[triton]"')
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "benchmark_mla.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # jitted kernels, not the interpreter's
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARK.parents[1]), env.get("PYTHONPATH", "")])  # this tree's kernels
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--compile-report", "--shapes", "1x131072", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {row["variant"]: row for row in json.loads(out.read_text())["compile_report"]}


def test_every_variant_compiles_for_sm90_without_spilling(report):
    assert set(report) == {"bf16", "fp8", "fp8_reload", "fp8_reload_8warps"}
    for name, row in report.items():
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, (name, row)
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0 and row["mma_sync"] > 0, (name, row)
        assert row["splits"] > 1  # one row of 128k tokens: split over the SMs


def test_the_bf16_cache_rows_stream_through_the_async_copy_pipeline(report):
    """Latent and rope key, one async copy each per pipeline stage."""
    row = report["bf16"]
    assert row["async_copies"] == {"bf16": 2 * row["num_stages"]}


def test_the_fp8_rows_rope_key_is_pipelined_thanks_to_its_16_byte_stride_unit(report):
    """The bf16 rope key of a 656-byte row has stride 328 (not a multiple of 16, the only integer divisibility Triton
    specialises on): handed over in units of 8 elements, its rows are known 16-byte aligned and go through the
    pipeline. A single load of each fp8 group tile, used by both products, does not (Triton 3.6)."""
    row = report["fp8"]
    assert row["async_copies"].get("bf16") == row["num_stages"]
    assert "f8E4M3FN" not in row["async_copies"]


@pytest.mark.parametrize("variant", ["fp8_reload", "fp8_reload_8warps"])
def test_reloading_the_fp8_tiles_pipelines_them_and_frees_registers(report, variant):
    """Each of the 4 group tiles loaded once per product: 8 fp8 async copies per stage, and fewer registers than the
    single-load kernel's (which holds the widened tiles between the two products)."""
    row = report[variant]
    assert row["async_copies"]["f8E4M3FN"] == 8 * row["num_stages"]
    assert row["async_copies"].get("bf16") == row["num_stages"]
    assert row["registers"] < report["fp8"]["registers"]
