"""The README's main job (``make demo`` = ``python -m mla_components.main``) end to end, as a user runs it."""

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from mla_components.checkpointing import load_hf_checkpoint


@pytest.mark.slow
def test_main_job_converts_the_real_model_trains_exports_and_ends_with_the_passkey_heatmap(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.main", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,  # a few minutes on 2 idle cores; allow for a machine shared with other jobs
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [s[:5] for s in steps] == [f"[{i}/9]" for i in range(1, 10)], steps
    assert "max |cached - uncached| logit" in proc.stdout
    assert "$ mla-tune run convert_to_mla --config smollm2_135m/convert_mla_256" in proc.stdout  # as a user types it

    # SmolLM2-135M-Instruct from the bundled GGUF, converted to MLA through the recipe
    origin, converted = out / "origin", out / "mla_256" / "model"
    assert json.loads((origin / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((converted / "config.json").read_text())["model_type"] == "deepseek_v3"
    report = json.loads((out / "mla_256" / "conversion_report.json").read_text())
    assert report["kv_lora_rank"] == 256 and report["cache_values_per_token_and_layer"] == 320
    held = report["heldout"]
    for key in ("perplexity_origin", "perplexity_converted", "kl_origin_to_converted"):
        assert math.isfinite(held[key]), held
    assert 1.0 < held["perplexity_origin"] < held["perplexity_converted"], held  # training-free conversion costs
    assert f"origin {held['perplexity_origin']:.2f}, converted {held['perplexity_converted']:.2f}" in proc.stdout

    # passkey retrieval of the origin and the converted model side by side: real, non-zero for the origin
    side_by_side = json.loads((out / "passkey_origin_vs_mla" / "results.json").read_text())
    by_name = {m["name"]: m for m in side_by_side["models"]}
    assert list(by_name) == ["smollm2_135m_origin", "smollm2_135m_mla_256"]
    assert by_name["smollm2_135m_origin"]["checkpoint"] == str(origin)
    assert by_name["smollm2_135m_mla_256"]["checkpoint"] == str(converted)
    assert by_name["smollm2_135m_origin"]["overall_accuracy"] > 0.0
    assert 0.0 <= by_name["smollm2_135m_mla_256"]["overall_accuracy"] <= 1.0
    for name, model in by_name.items():
        assert f"{name:<22} passkey 512: " in proc.stdout
        assert f"overall {model['overall_accuracy']:.2f}" in proc.stdout

    # the training path on mla_tiny
    assert "Loss:" in proc.stderr + proc.stdout  # Torchtune's progress bar

    sft, dpo = out / "sft" / "epoch_2", out / "dpo" / "epoch_0"
    _, sft_state = load_hf_checkpoint(sft)
    _, dpo_state = load_hf_checkpoint(dpo)
    assert any(not (sft_state[k] == dpo_state[k]).all() for k in sft_state)  # DPO trained from SFT
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["model_type"] == "deepseek_v3"

    results = json.loads((out / "passkey_eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["mla_tiny_sft", "mla_tiny_dpo"]  # side by side
    for model in results["models"]:
        assert model["checkpoint"] in (str(sft), str(dpo))
        assert 0.0 <= model["overall_accuracy"] <= 1.0
    heatmap = out / "passkey_eval" / "heatmap.png"
    assert Image.open(heatmap).size[0] > 400
    assert proc.stdout.rstrip().endswith(f"The passkey heatmap: {heatmap}")
