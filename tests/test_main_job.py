"""The README's main job (``make demo`` = ``python -m mla_components.main``) end to end, as a user runs it."""

import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from PIL import Image

from mla_components.checkpointing import load_hf_checkpoint


@pytest.mark.slow
def test_main_job_converts_trains_and_exports_the_real_model_and_ends_with_the_passkey_heatmap(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.main", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=2400,  # about 10 minutes on 2 idle cores; allow for a machine shared with other jobs
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [s[:5] for s in steps] == [f"[{i}/9]" for i in range(1, 10)], steps
    assert "max |cached - uncached| logit" in proc.stdout
    assert "$ mla-tune run convert_to_mla --config smollm2_135m/convert_mla_512" in proc.stdout  # as a user types it

    # SmolLM2-135M-Instruct from the bundled GGUF, converted to MLA through the recipe
    origin, converted = out / "origin", out / "mla_512" / "model"
    assert json.loads((origin / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((converted / "config.json").read_text())["model_type"] == "deepseek_v3"
    report = json.loads((out / "mla_512" / "conversion_report.json").read_text())
    assert report["kv_lora_rank"] == 512 and report["cache_values_per_token_and_layer"] == 576
    held = report["heldout"]
    for key in ("perplexity_origin", "perplexity_converted", "kl_origin_to_converted"):
        assert math.isfinite(held[key]), held
    assert 1.0 < held["perplexity_origin"] < held["perplexity_converted"], held  # training-free conversion costs
    assert f"origin {held['perplexity_origin']:.2f}, converted {held['perplexity_converted']:.2f}" in proc.stdout

    # needle SFT and DPO of the converted real model with Torchtune's recipes
    assert "Loss:" in proc.stderr + proc.stdout  # Torchtune's progress bar
    assert "$ mla-tune run --nproc_per_node 2 full_finetune_distributed --config smollm2_135m/sft_cpu" in proc.stdout
    sft, dpo = out / "sft" / "epoch_0", out / "dpo" / "epoch_0"
    _, converted_state = load_hf_checkpoint(converted)
    _, sft_state = load_hf_checkpoint(sft)
    _, dpo_state = load_hf_checkpoint(dpo)
    assert sft_state.keys() == converted_state.keys() == dpo_state.keys()
    assert any(not (converted_state[k] == sft_state[k]).all() for k in sft_state)  # SFT trained the converted model
    assert any(not (sft_state[k] == dpo_state[k]).all() for k in sft_state)  # DPO trained from SFT
    assert list((out / "sft" / "wandb").rglob("offline-run-*/run-*.wandb")) and (out / "sft" / "mlflow.db").is_file()
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["model_type"] == "deepseek_v3" and exported["kv_lora_rank"] == 512

    # passkey of origin, converted, SFT and DPO side by side on the standard prompt: real, non-zero for the origin
    results = json.loads((out / "passkey_eval" / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    assert list(by_name) == ["smollm2_135m_origin", "mla_512_converted", "mla_512_sft", "mla_512_dpo"]
    checkpoints = [str(origin), str(converted), str(sft), str(dpo)]
    assert [m["checkpoint"] for m in by_name.values()] == checkpoints
    assert by_name["smollm2_135m_origin"]["overall_accuracy"] > 0.0
    for name, model in by_name.items():
        assert 0.0 <= model["overall_accuracy"] <= 1.0
        assert f"{name:<22} passkey 512: " in proc.stdout
        assert f"overall {model['overall_accuracy']:.2f}" in proc.stdout
    heatmap = out / "passkey_eval" / "heatmap.png"
    assert Image.open(heatmap).size[0] > 400
    assert f"The passkey heatmap: {heatmap}" in proc.stdout

    # the GPU-trained long-context model, rebuilt from the delta in the repository, retrieves on this CPU
    rebuilt = out / "long_context" / "model"
    rebuilt_config = json.loads((rebuilt / "config.json").read_text())
    assert rebuilt_config["kv_lora_rank"] == 256 and rebuilt_config["rope_scaling"]["factor"] == 32.0
    # evaluated at the YaRN factor it was trained at, not the passkey config's default (x16)
    rerun = OmegaConf.load(out / "long_context" / "passkey_eval" / "passkey_eval.yaml")
    assert rerun.model.rope_scaling.factor == 32.0
    (long_model,) = json.loads((out / "long_context" / "passkey_eval" / "results.json").read_text())["models"]
    assert [(t["context_tokens"], t["depth"]) for t in long_model["trials"]] == [(3072, 0.0), (3072, 0.5), (3072, 1.0)]
    assert all(t["prompt_tokens"] > 2900 for t in long_model["trials"])
    assert long_model["overall_accuracy"] >= 2 / 3, long_model["trials"]  # 20/20 at 2k-4k (long_context.md, 6b)
    assert proc.stdout.rstrip().endswith(
        f"The long-context model: {rebuilt} (docs/results/long_context.md has it from 4k to 128k on a GPU)"
    )


@pytest.mark.parametrize(
    "flag, content, message",
    [
        ("--long-context-delta", None, "does not exist"),
        ("--long-context-delta", b"not a delta", "cannot be read"),
        ("--long-context-tokens", b"not tokens", "cannot be read"),
    ],
)
def test_step_9_inputs_are_checked_before_step_1(tmp_path, flag, content, message):
    """A missing or unreadable delta or tokens file stops the main job at once (exit 2, the flag and the fix named),
    before minutes of steps 1-8; nothing is written."""
    path = tmp_path / "given.safetensors"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.main", "--output", str(out), flag, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{flag} {path} {message}" in proc.stderr and "--no-long-context" in proc.stderr
    assert not out.exists() and "[1/" not in proc.stdout
