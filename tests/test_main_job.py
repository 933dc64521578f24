"""The README's main job (``make demo`` = ``python -m mla_components.main``) end to end, as a user runs it."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from mla_components.checkpointing import load_hf_checkpoint


@pytest.mark.slow
def test_main_job_trains_exports_and_ends_with_the_passkey_heatmap(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.main", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [s[:5] for s in steps] == [f"[{i}/6]" for i in range(1, 7)], steps
    assert "max |cached - uncached| logit" in proc.stdout
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
