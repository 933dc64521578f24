"""The scripts in benchmarks/ (not installed) run from any directory against the installed packages, and find the
configs they launch through the installed ``mla_recipes.configs``, never through the checkout's path."""

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
import time
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
        [sys.executable, str(BENCHMARKS / "benchmark_mla.py"), "--host-python", "--repeats", "5", "--json", "h.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "h.json").read_text())["host_python"]
    assert [(r["batch"], r["length"]) for r in rows] == [(1, 256), (1, 4096)]
    assert all(0 < r["around_launches_us"] < r["python_us"] < 10_000 for r in rows)
    assert all(0 < r["python_owned_buffers_us"] < 10_000 for r in rows)


def test_prefill_chunk_benchmark_compares_sdpa_kernels_on_mla_shapes_without_a_gpu(tmp_path):
    """``benchmark_prefill.py chunk``: the last prefill chunk of an MLA layer's expanded heads (query/key wider than
    the value). On the CPU SDPA's default runs, flash with the value zero-padded runs and gives the same attention,
    and the CUDA-only memory-efficient kernel is reported as refused, not timed. The prefill estimate scales the
    chunk's rate by the pairs a whole causal prefill attends, times the layers."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "benchmark_prefill.py"), "chunk", "--contexts", "256", "--chunk", "64",
         "--heads", "2", "--qk-dim", "32", "--v-dim", "16", "--layers", "3", "--repeats", "2", "--device", "cpu",
         "--json", "c.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["way"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert set(rows) == {"sdpa_default", "efficient", "flash_v_padded"}
    assert "ms" not in rows["efficient"] and rows["efficient"]["skipped"]
    for way in ("sdpa_default", "flash_v_padded"):
        row = rows[way]
        assert row["ms"] > 0 and row["tflops"] > 0, row
        pairs_ratio = (256 * 257 // 2) / (64 * (256 - 64) + 64 * 65 // 2)
        assert row["prefill_attention_s"] == pytest.approx(3 * pairs_ratio * row["ms"] / 1e3, rel=1e-6)
    assert rows["flash_v_padded"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("queries, keys", [(1, 1), (1, 9), (4, 4), (3, 10), (64, 256)])
def test_prefill_benchmark_counts_the_pairs_a_lower_right_causal_mask_attends(queries, keys):
    from torch.nn.attention.bias import causal_lower_right

    attended_pairs = _load(BENCHMARKS / "benchmark_prefill.py").attended_pairs
    assert attended_pairs(queries, keys) == int(causal_lower_right(queries, keys)._materialize().sum())


def test_prefill_model_benchmark_runs_the_project_prefill_and_decode_without_a_gpu(tmp_path):
    """``benchmark_prefill.py model``: tiny MLA and GQA models prefill a prompt in chunks and decode; the cache bytes
    are the allocated caches' (MLA: layers x (latent + rope) per position)."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "benchmark_prefill.py"), "model", "--models", "mla_tiny", "gqa_tiny",
         "--contexts", "300", "--prefill-chunk", "128", "--new-tokens", "3", "--device", "cpu", "--json", "m.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert set(rows) == {"mla_tiny", "gqa_tiny"}
    assert all(r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["context"] == 300 for r in rows.values())
    from mla_components.models import MLA_TINY

    per_position = MLA_TINY.num_layers * (MLA_TINY.kv_lora_rank + MLA_TINY.qk_rope_head_dim) * 4  # fp32 on the CPU
    # room for the prompt, the decode step's two untimed tokens (its eager call and its capture) and the timed ones
    assert rows["mla_tiny"]["kv_cache_bytes"] == per_position * (300 + 2 + 3 + 1)


# what a stand-in study's `rebuild` leaves: the rebuilt model's config.json, trained at REBUILT_FACTOR (default: the
# factor the runs use), which the session checks before evaluating
REBUILD_CONFIG = (
    '[ "$1" = rebuild ] && mkdir -p "$REBUILT" && '
    'echo "{\\"rope_scaling\\": {\\"factor\\": ${REBUILT_FACTOR:-${YARN_FACTOR:-16}}}}" > "$REBUILT/config.json"\n'
)


def _stand_in(tmp_path: Path, name: str, body: str) -> Path:
    """An executable ``tmp_path/bin/NAME`` running the bash ``body``; put ``tmp_path/bin`` first on PATH."""
    stand_in = tmp_path / "bin" / name
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text(f"#!/usr/bin/env bash\n{body}")
    stand_in.chmod(0o755)
    return stand_in


def test_device_session_runs_the_stages_in_order_and_returns_the_results(tmp_path):
    """``benchmarks/device/long_context_session.sh``: with stand-ins for the study's stages and for ``python3``, the
    pipeline trains before it evaluates, evaluates the DPO models at every length with 4 trials, keeps every trained
    model as a delta (MLA over the CPU conversion, the GQA control over the origin), and ``collect`` returns the
    reports and each delta once, in parts under 16 MiB, at most three deltas per call (a call returns 8 files)."""
    session = BENCHMARKS / "device" / "long_context_session.sh"
    calls = tmp_path / "calls.txt"
    stand_ins = tmp_path / "bin"
    study = _stand_in(
        tmp_path,
        "study.sh",
        f'echo "$1 TAG=${{TAG:-}} MODELS=${{MODEL_NAMES:-}} TRIALS=${{TRIALS:-}} ARGS=${{EVAL_ARGS:-}} '
        f'TUNED=${{TUNED:-}} BASE=${{BASE:-}}" >> {calls}\n'
        '[ "$1" = extract ] && head -c 20000000 /dev/zero > "$OUTPUT"\n'
        '[ "$1" = prepare ] && mkdir -p outputs/smollm2_135m/mla_256 '
        "&& echo tokens > outputs/smollm2_135m/mla_256/calibration_tokens.safetensors\n"
        '[ "$1" = base ] && mkdir -p outputs/smollm2_135m/mla_256_cpu/model '  # the delta's base, beside training
        "&& touch outputs/smollm2_135m/mla_256_cpu/model/config.json\n"
        '[ "$1" = delta ] && head -c 20000000 /dev/zero > "$3/mla_dpo_delta.safetensors"\n'
        "exit 0\n",
    )
    _stand_in(tmp_path, "python3", f'echo "python3 $*" >> {calls}\n')  # the delta extraction
    results, out = tmp_path / "results", tmp_path / "out"
    env = {
        "PATH": f"{stand_ins}:/usr/bin:/bin",
        "STUDY": str(study),
        "RESULTS": str(results),
        "BIG": str(tmp_path / "big"),
        "OUT": str(out),
        "DEVICE": "cpu",
    }
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([str(session), "pipeline"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    stages = [line.split()[0] for line in lines if not line.startswith(("python3", "base "))]  # background runs
    assert sum(line.startswith("base ") for line in lines) == 1
    assert stages[:3] == ["prepare", "sft", "sft64k"]
    dpo = stages.index("dpo")
    assert set(stages[dpo + 1 :]) == {"landmark", "heldout", "multi", "delta", "extract"}
    extracts = sorted(line.split("TUNED=")[1] for line in lines if line.startswith("extract "))
    assert extracts == [
        "outputs/smollm2_135m/long_dpo_gqa/epoch_0 BASE=origin",
        "outputs/smollm2_135m/long_sft64k_gqa/epoch_0 BASE=origin",
        "outputs/smollm2_135m/long_sft64k_mla/epoch_0 BASE=",  # the study's default: the CPU conversion
    ]
    after_dpo = [line for line in lines if line.startswith("landmark") and "_dpo" in line and "fp8" not in line]
    fp8 = [line for line in lines if line.startswith("landmark TAG=fp8_128k")]
    assert fp8 == [
        "landmark TAG=fp8_128k MODELS=mla_dpo TRIALS=2 "
        "ARGS=context_lengths=[131072] model.kv_cache_dtype=fp8_e4m3 TUNED= BASE="
    ]
    lengths = {arg for line in after_dpo for arg in line.split() if arg.startswith("ARGS=")}
    assert lengths == {
        "ARGS=context_lengths=[131072]",  # each 128k run also gets depths=...
        "ARGS=context_lengths=[65536]",
        "ARGS=context_lengths=[4096,8192,16384,32768]",
    }
    assert all("TRIALS=4" in line for line in after_dpo) and len(after_dpo) == 8
    assert not any(line.startswith("landmark TAG=s64") for line in lines)  # only with EVAL_SFT64K=1
    first_short = min(i for i, line in enumerate(lines) if "4096,8192,16384,32768" in line)
    assert lines.index(next(line for line in lines if line.startswith("delta"))) < first_short  # the delta first
    timeline = (results / "timeline.txt").read_text()
    assert timeline.index("sft64k done") < timeline.index("dpo start")
    assert timeline.rstrip().endswith("pipeline done")

    def collect(out: Path) -> dict[str, int]:
        """The deltas a call returns, by name: bytes of their parts."""
        collected = subprocess.run([str(session), "collect"], env={**env, "OUT": str(out)}, capture_output=True)
        assert collected.returncode == 0, collected.stderr
        assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
        deltas: dict[str, int] = {}
        for part in out.glob("*_delta.part_*"):
            deltas[part.name.split(".")[0]] = deltas.get(part.name.split(".")[0], 0) + part.stat().st_size
        return deltas

    first = collect(out)  # the four deltas exist now: three, the MLA ones among them, in this call
    assert len(first) == 3 and {"mla_sft64k_delta", "mla_dpo_delta"} <= set(first)
    assert set(first.values()) == {20_000_000} and len(list(out.iterdir())) <= 8
    listing = subprocess.run(["tar", "tzf", str(out / "results.tgz")], capture_output=True, text=True).stdout
    assert "./timeline.txt" in listing and ".safetensors" not in listing
    assert not (out / "results.partial.tgz").exists()
    second = collect(tmp_path / "out2")  # the next call: the one left, then nothing
    assert set(second) == {"gqa_sft64k_delta", "gqa_dpo_delta"} - set(first) and len(second) == 1
    assert collect(tmp_path / "out3") == {}

    # MODELS=mla (no GQA control): no run, delta or multi-needle name of a GQA model; EVAL_SFT64K=1 adds the 64k
    # stage's model at 128k
    calls.unlink()
    (results / "timeline.txt").unlink()
    env_mla = {**env, "MODELS": "mla", "EVAL_SFT64K": "1"}
    run = subprocess.run([str(session), "pipeline"], cwd=work, env=env_mla, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    assert not any("gqa" in line for line in lines), [line for line in lines if "gqa" in line]
    assert sum(line.startswith("landmark TAG=s64_mla MODELS=mla_sft64k TRIALS=2 ") for line in lines) == 1
    assert sum(line.startswith("multi TAG=all MODELS=mla_sft64k,mla_dpo ") for line in lines) == 1
    assert sum(line.startswith("landmark") and "TRIALS=4" in line for line in lines) == 4
    (results / "timeline.txt").unlink()

    # wait on a machine without a pipeline (a bare one, after the last was left idle) ends at once, saying so
    fresh = subprocess.run(
        [str(session), "wait", "60"], env={**env, "RESULTS": str(tmp_path / "bare")}, capture_output=True, text=True
    )
    assert fresh.returncode == 3 and "it is a fresh one; run install, part, start" in fresh.stderr

    # a part that reaches a machine without the install (the install call's machine was released) says so
    (work / ".big").mkdir()
    (work / ".big" / "gguf.part_aa").write_bytes(b"only the first part")
    part_env = {**env, "BIG": str(tmp_path / "big"), "SITE": str(tmp_path / "site")}
    bare = subprocess.run([str(session), "part"], cwd=work, env=part_env, capture_output=True, text=True)
    assert bare.returncode == 3 and "this is a fresh machine" in bare.stderr and "run install again" in bare.stderr
    (tmp_path / "site" / "torchtune").mkdir(parents=True)
    kept = subprocess.run([str(session), "part"], cwd=work, env=part_env, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
    assert (tmp_path / "big" / "gguf.part_aa").read_bytes() == b"only the first part"
    # the same part carried again is not rewritten (a pipeline on the machine may be reading it)
    copied = (tmp_path / "big" / "gguf.part_aa").stat().st_mtime_ns
    again = subprocess.run([str(session), "part"], cwd=work, env=part_env, capture_output=True, text=True)
    assert again.returncode == 0 and (tmp_path / "big" / "gguf.part_aa").stat().st_mtime_ns == copied

    # start refuses a GGUF whose parts did not all arrive, before anything runs
    refused = subprocess.run([str(session), "start", "5"], cwd=work, env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "md5 is not a1231443440b107ff29f02bdb38c9d0a (parts: gguf.part_aa)" in refused.stderr
    assert not (results / "timeline.txt").exists()

    # with every part there, the default pipeline starts: this tree copied to WORK, then the wait
    start_env = {**env, "GGUF_MD5": hashlib.md5(b"only the first part").hexdigest(), "WORK": str(tmp_path / "copy")}
    started = subprocess.run(
        [str(session), "start", "1"], cwd=work, env=start_env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0 and "unbound variable" not in started.stderr, started.stderr
    assert (tmp_path / "copy" / ".big" / "gguf.part_aa").read_bytes() == b"only the first part"
    # a second pipeline on the same machine (its own RESULTS and WORK) leaves the joined GGUF as it is: the first
    # one may be reading it
    gguf = tmp_path / "big" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    joined = gguf.stat().st_mtime_ns
    second_env = {**start_env, "RESULTS": str(tmp_path / "results2"), "WORK": str(tmp_path / "copy2")}
    second = subprocess.run(
        [str(session), "start", "1"], cwd=work, env=second_env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert gguf.stat().st_mtime_ns == joined and gguf.read_bytes() == b"only the first part"


@pytest.mark.parametrize("checks", ["1", "bench"])
def test_device_session_install_starts_the_checks_in_the_background(tmp_path, checks):
    """``install`` installs the wheelhouse and keeps the carried part, then starts the GPU kernel tests and the eager
    host-time benchmark from a copy of the tree; ``CHECKS=bench`` then also runs issues 17 and 18's benchmarks."""
    session = BENCHMARKS / "device" / "long_context_session.sh"
    calls = tmp_path / "calls.txt"
    _stand_in(tmp_path, "python3", f'echo "$*" >> {calls}\n')
    work, results = tmp_path / "work", tmp_path / "results"
    (work / ".big").mkdir(parents=True)
    (work / ".big" / "gguf.part_ae").write_bytes(b"part")
    (work / "recipes").mkdir()
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "RESULTS": str(results),
        "BIG": str(tmp_path / "big"),
        "SITE": str(tmp_path / "site"),
        "CHECKS_DIR": str(tmp_path / "checks"),
        "CHECKS": checks,
    }
    done = subprocess.run([str(session), "install"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "big" / "gguf.part_ae").read_bytes() == b"part"
    assert (tmp_path / "checks" / ".big" / "gguf.part_ae").is_file()  # the checks' own copy of the tree
    expected = ["-m pip install", "benchmarks/benchmark_mla.py --host-overhead", "-m pytest"]
    if checks == "bench":
        expected += [
            "benchmarks/benchmark_mla.py --fp8",
            "benchmarks/benchmark_decode_e2e.py --contexts 32768 131072 --models mla_1b:triton gqa_1b "
            "mla_1b_fp8:triton",
            "benchmarks/benchmark_prefill.py model --models mla_1b gqa_1b --contexts 131072 1048576",
        ]
    for _ in range(100):  # the checks run in the background
        lines = calls.read_text().splitlines() if calls.exists() else []
        if len(lines) >= len(expected):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # nothing more comes
    lines = calls.read_text().splitlines()
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected, strict=True))
    assert all(f"--json {results}/" in line for line in lines[1:] if "benchmark" in line)


def test_device_session_from_delta_rebuilds_the_64k_model_then_trains_dpo_and_evaluates(tmp_path):
    """``PIPELINE=from_delta``: the carried 64k-stage delta is rebuilt first, DPO trains the MLA model alone from the
    rebuilt one, and the DPO model is evaluated at every length and with the fp8 cache; the rebuilt model's 128k runs
    beside DPO only with ``EVAL_SFT64K=1``, the YaRN probe only with ``PROBE=1``, and 1M only with ``MILLION``, after
    the rest (``both``: the bf16 cache, then the fp8 cache, each alone). ``start`` refuses to begin without the
    carried delta, or with an unknown ``PIPELINE``."""
    session = BENCHMARKS / "device" / "long_context_session.sh"
    calls = tmp_path / "calls.txt"
    stand_ins = tmp_path / "bin"
    study = _stand_in(
        tmp_path,
        "study.sh",
        f'echo "$1 TAG=${{TAG:-}} MODELS=${{MODELS:-}} NAMES=${{MODEL_NAMES:-}} TRIALS=${{TRIALS:-}} '
        f'DELTA=${{DELTA:-}} DPO_ARGS=${{DPO_ARGS:-}} ARGS=${{EVAL_ARGS:-}}" >> {calls}\n'
        '[ "$1" = delta ] && head -c 100 /dev/zero > "$3/mla_dpo_delta.safetensors"\n'
        + REBUILD_CONFIG
        + '[ "$1" = dpo ] && sleep 1\n'  # long enough for the runs started beside it to log their start
        "exit 0\n",
    )
    results, big, work = tmp_path / "results", tmp_path / "big", tmp_path / "work"
    env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "STUDY": str(study), "RESULTS": str(results), "BIG": str(big)}
    work.mkdir()
    run = subprocess.run([str(session), "from_delta"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("rebuild ") and f"DELTA={big}/mla_sft64k_delta.safetensors" in lines[0]
    dpo = next(i for i, line in enumerate(lines) if line.startswith("dpo "))
    assert "MODELS=mla " in lines[dpo]
    assert "DPO_ARGS=checkpointer.checkpoint_dir=outputs/smollm2_135m/long_sft64k_mla_delta" in lines[dpo]
    after = [line for line in lines if "NAMES=mla_dpo " in line]
    assert not any(line.startswith("landmark ") and "NAMES=mla_sft64k_delta " in line for line in lines)
    runs = {line.split()[1]: line for line in after}
    assert set(runs) == {"TAG=mla_128k_a", "TAG=mla_128k_b", "TAG=mla_64k", "TAG=mla_4k_32k", "TAG=fp8_128k"}
    assert "model.kv_cache_dtype=fp8_e4m3" in runs["TAG=fp8_128k"]
    assert all("TRIALS=4" in runs[t] for t in ("TAG=mla_128k_a", "TAG=mla_128k_b", "TAG=mla_64k", "TAG=mla_4k_32k"))
    delta = next(i for i, line in enumerate(lines) if line.startswith("delta "))
    assert delta < lines.index(runs["TAG=mla_4k_32k"])
    assert {line.split()[0] for line in lines[dpo + 1 :]} == {"landmark", "delta", "heldout", "multi"}
    timeline = (results / "timeline.txt").read_text()
    assert timeline.index("rebuild done") < timeline.index("dpo start") < timeline.index("dpo done")
    assert timeline.index("dpo done") < timeline.index("mla_128k_a start")
    assert "s64_128k" not in timeline and "yarn_probe" not in timeline
    assert timeline.rstrip().endswith("pipeline done")

    # MILLION=both: the DPO model's 1M prompts with the bf16 and then the fp8 cache, the first started only after
    # every other run has ended, the second after the first; SFT64K_DELTA names the carried delta; EVAL_SFT64K=1 runs
    # the rebuilt model at 128k beside DPO; PROBE=1 doubles the trained YaRN factor
    calls.unlink()
    (results / "timeline.txt").unlink()
    x32 = {
        "MILLION": "both",
        "MILLION_DEPTHS": "0.0,0.5",
        "MILLION_GPUS": "0",
        "SFT64K_DELTA": "mla_sft64k_x32_delta.safetensors",
        "YARN_FACTOR": "32.0",
        "EVAL_SFT64K": "1",
        "PROBE": "1",
    }
    run = subprocess.run(
        [str(session), "from_delta"], cwd=work, env={**env, **x32}, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    assert f"DELTA={big}/mla_sft64k_x32_delta.safetensors" in lines[0]
    assert sum("TAG=yarn_probe_128k " in line and "yarn_mla.factor=64.0" in line for line in lines) == 1
    assert [line.split()[0] for line in lines if "NAMES=mla_sft64k_delta" in line] == ["landmark", "landmark", "multi"]
    timeline = (results / "timeline.txt").read_text().splitlines()
    assert timeline.index(next(t for t in timeline if t.endswith("s64_128k_a start"))) < timeline.index(
        next(t for t in timeline if t.endswith("dpo done"))
    )  # beside DPO
    million_runs = [line.split(" ", 2) for line in lines if line.startswith("million ")]
    assert all(" NAMES=mla_dpo TRIALS=1 " in rest for _, _, rest in million_runs)
    assert [(tag, rest.split(" ARGS=")[1]) for _, tag, rest in million_runs] == [
        ("TAG=mla_d0.0_t0", "depths=[0.0] first_trial=0"),
        ("TAG=mla_d0.5_t0", "depths=[0.5] first_trial=0"),
        ("TAG=mla_fp8_d0.0_t0", "depths=[0.0] first_trial=0 model.kv_cache_dtype=fp8_e4m3"),
        ("TAG=mla_fp8_d0.5_t0", "depths=[0.5] first_trial=0 model.kv_cache_dtype=fp8_e4m3"),
    ]
    million = timeline.index(next(line for line in timeline if line.endswith("mla_1m_d0.0_t0 start")))
    assert all(not line.endswith(" start") or "mla_1m" in line for line in timeline[million:])
    ends = [line.split("] ", 1)[1] for line in timeline[million:]]
    assert ends[:8] == [  # one GPU: one after the other
        f"mla_1m{cache}_d{depth}_t0 {event}" for cache in ("", "_fp8") for depth in ("0.0", "0.5")
        for event in ("start", "rc=0")
    ]  # fmt: skip
    before = timeline[:million]  # every other run (11, with the probe and the two 128k runs beside DPO) had ended
    assert sum(line.endswith(" start") for line in before) - 2 == sum(" rc=" in line for line in before) == 11

    (work / ".big").mkdir()  # every GGUF part is here, the delta is not
    (work / ".big" / "gguf.part_aa").write_bytes(b"gguf")
    (results / "timeline.txt").unlink()
    env["GGUF_MD5"] = hashlib.md5(b"gguf").hexdigest()
    refused = subprocess.run(
        [str(session), "start", "5"], cwd=work, env={**env, "PIPELINE": "from_delta"}, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "carry .big/mla_sft64k_delta.safetensors (SFT64K_DELTA names it)" in refused.stderr
    assert not (results / "timeline.txt").exists()
    # a delta the repository ships travels with the tree: found there (this machine then lacks only the install)
    shipped = work / "docs" / "results" / "long_context" / "mla_long_context_delta.safetensors"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"delta")
    from_shipped = subprocess.run(
        [str(session), "start", "5"],
        cwd=work,
        env={**env, "PIPELINE": "eval_sft64k_delta", "SFT64K_DELTA": shipped.name, "SITE": str(tmp_path / "no_site")},
        capture_output=True,
        text=True,
    )
    assert from_shipped.returncode == 1 and "run the install call first" in from_shipped.stderr, from_shipped.stderr
    assert (big / shipped.name).read_bytes() == b"delta"
    unknown = subprocess.run(
        [str(session), "start", "5"], cwd=work, env={**env, "PIPELINE": "from_deltas"}, capture_output=True, text=True
    )
    assert unknown.returncode == 2
    assert "PIPELINE=from_deltas: use pipeline, from_delta, extend_delta, from_dpo_delta or eval_sft64k_delta" in (
        unknown.stderr
    )
    assert not (results / "timeline.txt").exists()
    no_dpo_delta = subprocess.run(
        [str(session), "start", "5"],
        cwd=work,
        env={**env, "PIPELINE": "from_dpo_delta"},
        capture_output=True,
        text=True,
    )
    assert no_dpo_delta.returncode == 1
    assert "carry .big/mla_dpo_delta.safetensors (DPO_DELTA names it)" in no_dpo_delta.stderr


def test_device_session_extend_delta_trains_the_64k_stage_again_at_the_new_factor(tmp_path):
    """``PIPELINE=extend_delta YARN_FACTOR=128.0``: the carried 64k-stage model (trained at x32) is rebuilt, its 64k
    stage trained again from it at the new factor (no factor check stops it), kept as a delta, then DPO from that
    stage's output, the grid, and the 1M prompts after the rest."""
    session = BENCHMARKS / "device" / "long_context_session.sh"
    calls = tmp_path / "calls.txt"
    study = _stand_in(
        tmp_path,
        "study.sh",
        f'echo "$1 TAG=${{TAG:-}} MODELS=${{MODELS:-}} NAMES=${{MODEL_NAMES:-}} YARN=${{YARN_FACTOR:-}} '
        f"DELTA=${{DELTA:-}} TUNED=${{TUNED:-}} SFT_ARGS=${{SFT_ARGS:-}} DPO_ARGS=${{DPO_ARGS:-}} "
        f'ARGS=${{EVAL_ARGS:-}}" >> {calls}\n'
        '[ "$1" = delta ] && head -c 100 /dev/zero > "$3/mla_dpo_delta.safetensors"\n' + REBUILD_CONFIG + "exit 0\n",
    )
    results, big, work = tmp_path / "results", tmp_path / "big", tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "STUDY": str(study),
        "RESULTS": str(results),
        "BIG": str(big),
        "SFT64K_DELTA": "x32.safetensors",
        "YARN_FACTOR": "128.0",
        "REBUILT_FACTOR": "32.0",
        "MILLION": "1",
        "MILLION_GPUS": "0",
    }
    run = subprocess.run([str(session), "extend_delta"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    stages = [line.split()[0] for line in lines]
    assert stages[:2] == ["rebuild", "sft64k"] and stages.index("dpo") > 1 and stages.count("extract") == 1
    assert f"DELTA={big}/x32.safetensors " in lines[0]
    sft64k = lines[1]
    assert "MODELS=mla " in sft64k and "YARN=128.0 " in sft64k
    assert "SFT_ARGS=checkpointer.checkpoint_dir=outputs/smollm2_135m/long_sft64k_mla_delta " in sft64k
    (extract,) = [line for line in lines if line.startswith("extract ")]
    assert "TUNED=outputs/smollm2_135m/long_sft64k_mla/epoch_0 " in extract
    (dpo,) = [line for line in lines if line.startswith("dpo ")]
    assert "MODELS=mla " in dpo and "DPO_ARGS= " in dpo  # the DPO config's own checkpoint: the new 64k stage
    tags = {line.split()[1] for line in lines if line.startswith("landmark ")}
    assert tags == {f"TAG={t}" for t in ("mla_128k_a", "mla_128k_b", "mla_64k", "mla_4k_32k", "fp8_128k")}
    assert lines[-1].startswith("million TAG=mla_d0.5_t0 MODELS= NAMES=mla_dpo YARN=128.0 DELTA= ")
    timeline = (results / "timeline.txt").read_text()
    assert "FAILED" not in timeline and timeline.rstrip().endswith("pipeline done")
    assert timeline.index("sft64k done") < timeline.index("dpo start")

    # without YARN_FACTOR there is nothing to extend to: start refuses before anything runs
    (work / ".big").mkdir()
    (work / ".big" / "gguf.part_aa").write_bytes(b"gguf")
    (results / "timeline.txt").unlink()
    env = {k: v for k, v in env.items() if k != "YARN_FACTOR"}
    refused = subprocess.run(
        [str(session), "start", "5"],
        cwd=work,
        env={**env, "PIPELINE": "extend_delta", "GGUF_MD5": hashlib.md5(b"gguf").hexdigest()},
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "PIPELINE=extend_delta: set YARN_FACTOR" in refused.stderr
    assert not (results / "timeline.txt").exists()


@pytest.mark.parametrize(
    "pipeline, delta_var, rebuilt, model",
    [
        ("from_dpo_delta", "DPO_DELTA", "long_dpo_mla_delta", "mla_dpo_delta"),
        ("eval_sft64k_delta", "SFT64K_DELTA", "long_sft64k_mla_delta", "mla_sft64k_delta"),
    ],
)
def test_device_session_evaluates_a_rebuilt_model_without_training(tmp_path, pipeline, delta_var, rebuilt, model):
    """``PIPELINE=from_dpo_delta`` / ``eval_sft64k_delta``: the carried delta is rebuilt, nothing trains, and the
    rebuilt model gets the whole grid (4 trials), the fp8 cache at 128k, held-out text, multi-needle and, with
    ``MILLION=1``, the 1M prompt (bf16 cache) after the rest; ``GRID=0``: the 1M prompt alone."""
    session = BENCHMARKS / "device" / "long_context_session.sh"
    calls = tmp_path / "calls.txt"
    study = _stand_in(
        tmp_path,
        "study.sh",
        f'echo "$1 TAG=${{TAG:-}} NAMES=${{MODEL_NAMES:-}} TRIALS=${{TRIALS:-}} DELTA=${{DELTA:-}} '
        f'REBUILT=${{REBUILT:-}} ARGS=${{EVAL_ARGS:-}}" >> {calls}\n' + REBUILD_CONFIG + "exit 0\n",
    )
    results, big, work = tmp_path / "results", tmp_path / "big", tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "STUDY": str(study),
        "RESULTS": str(results),
        "BIG": str(big),
        "MILLION": "1",
        "MILLION_GPUS": "0",
        delta_var: "x32.safetensors",
    }
    run = subprocess.run([str(session), pipeline], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("rebuild ") and f"DELTA={big}/x32.safetensors " in lines[0]
    assert f"REBUILT=outputs/smollm2_135m/{rebuilt} " in lines[0]
    assert {line.split()[0] for line in lines[1:]} == {"landmark", "heldout", "multi", "million"}
    tags = {line.split()[1] for line in lines if line.startswith("landmark ")}
    assert tags == {f"TAG={t}" for t in ("mla_128k_a", "mla_128k_b", "mla_64k", "mla_4k_32k", "fp8_128k")}
    assert all(f"NAMES={model} " in line for line in lines[1:] if not line.startswith("heldout"))
    assert [line.split()[:3] for line in lines if line.startswith("million ")] == [
        ["million", "TAG=mla_d0.5_t0", f"NAMES={model}"]
    ]
    assert lines[-1].startswith("million ") and lines[-1].endswith("ARGS=depths=[0.5] first_trial=0")
    assert (results / "timeline.txt").read_text().rstrip().endswith("pipeline done")

    calls.unlink()
    (results / "timeline.txt").unlink()
    only = subprocess.run([str(session), pipeline], cwd=work, env={**env, "GRID": "0"}, capture_output=True, text=True)
    assert only.returncode == 0, only.stderr
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["rebuild", "million"]

    # MILLION_GPUS=0,1 with 2 depths x 3 trials: six single-prompt processes, the k-th on GPU k mod 2, the two GPUs'
    # queues side by side and one process at a time on each; together the prompts of the 2 x 3 grid
    calls.unlink()
    (results / "timeline.txt").unlink()
    study.write_text(
        f'#!/usr/bin/env bash\necho "$1 GPU=${{CUDA_VISIBLE_DEVICES:-}} TAG=${{TAG:-}} TRIALS=${{TRIALS:-}} '
        f'ARGS=${{EVAL_ARGS:-}}" >> {calls}\n' + REBUILD_CONFIG + '[ "$1" = million ] && sleep 1\nexit 0\n'
    )
    spread = {**env, "GRID": "0", "MILLION_GPUS": "0,1", "MILLION_DEPTHS": "0.0,0.5", "MILLION_TRIALS": "3"}
    both = subprocess.run([str(session), pipeline], cwd=work, env=spread, capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    runs = [line.split(" ", 4) for line in calls.read_text().splitlines() if line.startswith("million ")]
    assert all(trials == "TRIALS=1" for _, _, _, trials, _ in runs)
    grid = {(gpu, tag): args for _, gpu, tag, _, args in runs}
    assert grid == {
        (f"GPU={k % 2}", f"TAG=mla_d{depth}_t{trial}"): f"ARGS=depths=[{depth}] first_trial={trial}"
        for k, (depth, trial) in enumerate((d, t) for d in ("0.0", "0.5") for t in range(3))
    }
    events = [line.split("] ", 1)[1] for line in (results / "timeline.txt").read_text().splitlines()]
    million = [e for e in events if e.startswith("mla_1m_")]
    assert len(million) == 12 and events[-1] == "pipeline done"
    on_gpu0 = {f"mla_1m_d{d}_t{t}" for d, t in (("0.0", 0), ("0.0", 2), ("0.5", 1))}
    running, both_busy = {"0": 0, "1": 0}, False
    for event in million:
        gpu = "0" if event.split()[0] in on_gpu0 else "1"
        running[gpu] += 1 if event.endswith(" start") else -1
        assert running[gpu] in (0, 1)  # one 1M prompt at a time per GPU
        both_busy |= running == {"0": 1, "1": 1}
    assert both_busy  # the GPUs' queues run side by side

    # a model trained at x32 evaluated without YARN_FACTOR=32.0 would run at x16: the pipeline stops after the rebuild
    calls.unlink()
    (results / "timeline.txt").unlink()
    wrong = subprocess.run(
        [str(session), pipeline], cwd=work, env={**env, "REBUILT_FACTOR": "32.0"}, capture_output=True, text=True
    )
    assert wrong.returncode == 1
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["rebuild"]
    timeline = (results / "timeline.txt").read_text()
    assert "has YaRN factor 32.0 in config.json, the runs would use 16; set YARN_FACTOR=32.0" in timeline


def test_study_yarn_factor_reaches_the_trained_models_and_not_the_anchors(tmp_path):
    """``YARN_FACTOR=32 benchmarks/long_context_study.sh``: SFT and DPO train at that factor and the trained models'
    passkey runs evaluate at it, while the untrained anchors (origin + YaRN x16) keep the configs' factor."""
    calls = tmp_path / "calls.txt"
    stand_ins = tmp_path / "bin"
    _stand_in(tmp_path, "python3", f'echo "$*" >> {calls}\n')
    env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "MODELS": "mla", "YARN_FACTOR": "32.0"}
    study = BENCHMARKS / "long_context_study.sh"
    for stage in ("sft", "dpo", "landmark", "anchors"):
        run = subprocess.run(
            [str(study), stage, "model.gguf", str(tmp_path / "r")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
    sft, dpo, landmark, anchors = calls.read_text().splitlines()
    assert "long_sft_mla.yaml" in sft and sft.split()[-1] == "yarn.factor=32.0"
    assert "long_dpo_mla.yaml" in dpo and dpo.split()[-1] == "yarn.factor=32.0"
    assert "passkey_landmark" in landmark and "yarn_mla.factor=32.0 yarn_gqa.factor=32.0" in landmark
    assert "passkey_anchors" in anchors and ".factor=" not in anchors


def test_study_rebuild_converts_again_only_when_the_origin_is_missing(tmp_path):
    """``rebuild`` needs the origin's directory (the tokenizer of every later stage): an existing CPU base is reused
    only when the origin is there too; the base is calibrated on the shipped token windows the delta names."""
    calls = tmp_path / "calls.txt"
    stand_ins = tmp_path / "bin"
    _stand_in(tmp_path, "python3", f'echo "$*" >> {calls}\n')
    base = tmp_path / "outputs" / "smollm2_135m" / "mla_256_cpu" / "model"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "DELTA": "d.safetensors"}
    study = [str(BENCHMARKS / "long_context_study.sh"), "rebuild", "model.gguf", str(tmp_path / "r")]

    assert subprocess.run(study, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    convert, apply = calls.read_text().splitlines()
    assert "convert_to_mla.py" in convert and "origin_output_dir=outputs/smollm2_135m/origin" in convert
    assert "calibration.tokens_file=docs/results/long_context/mla_256_calibration_tokens.safetensors" in convert
    assert apply.split()[:3] == ["-m", "mla_components.checkpointing.delta", "apply"]

    calls.unlink()
    origin = tmp_path / "outputs" / "smollm2_135m" / "origin"
    origin.mkdir()
    (origin / "config.json").write_text("{}")
    assert subprocess.run(study, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    (apply,) = calls.read_text().splitlines()
    assert "--output outputs/smollm2_135m/long_sft64k_mla_delta" in apply


def test_study_extract_makes_a_delta_over_the_base_named_and_refuses_an_unknown_one(tmp_path):
    """``extract``: the GQA control's delta is made over the origin and names the command that writes the origin;
    an MLA delta is made over the CPU conversion; a BASE other than mla/origin stops before anything runs."""
    calls = tmp_path / "calls.txt"
    stand_ins = tmp_path / "bin"
    _stand_in(tmp_path, "python3", f'echo "$*" >> {calls}\n')
    for directory in ("origin", "mla_256_cpu/model"):
        (tmp_path / "outputs" / "smollm2_135m" / directory).mkdir(parents=True)
        (tmp_path / "outputs" / "smollm2_135m" / directory / "config.json").write_text("{}")
    study = [str(BENCHMARKS / "long_context_study.sh"), "extract", "model.gguf", str(tmp_path / "r")]

    def extract(base: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "TUNED": "t/epoch_0", "OUTPUT": "d.safetensors", "BASE": base}
        return subprocess.run(study, cwd=tmp_path, env=env, capture_output=True, text=True)

    assert extract("origin").returncode == 0
    assert extract("mla").returncode == 0
    gqa, mla = calls.read_text().splitlines()  # no conversion ran: both bases exist
    assert gqa.split()[:5] == [
        "-m",
        "mla_components.checkpointing.delta",
        "extract",
        "--base",
        "outputs/smollm2_135m/origin",
    ]
    assert "--tuned t/epoch_0 --output d.safetensors" in gqa
    assert gqa.endswith("output_dir=outputs/smollm2_135m/mla_256_cpu origin_output_dir=outputs/smollm2_135m/origin")
    assert "--base outputs/smollm2_135m/mla_256_cpu/model" in mla
    assert mla.endswith("output_dir=outputs/smollm2_135m/mla_256_cpu")

    refused = extract("llama")
    assert refused.returncode == 2 and "BASE=llama: use mla (the CPU conversion) or origin" in refused.stderr
    assert len(calls.read_text().splitlines()) == 2
