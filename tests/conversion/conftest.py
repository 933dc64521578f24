"""Session fixtures for the origin-model tests: SmolLM2-135M-Instruct read once from the bundled GGUF by
transformers (the reference model and tokenizer), the origin built from it, its HF directory written once, and a
randomly initialised HF directory with Llama-3.2-1B's layout at reduced depth and vocabulary."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests._requirements import require_module, unavailable

LLAMA32_1B_LAYOUT = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131_072,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    # reduced: 2 of 16 layers, 4096 of 128256 ids (the SmolLM2 tokenizer files ride along; tests feed ids < 4096)
    num_hidden_layers=2,
    vocab_size=4096,
)


def randomize_hf_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every part (RoPE included) moves the logits: N(0, 0.05), norms around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    require_module("transformers", "the reference implementation (pip install -e '.[dev]')")
    require_module("gguf", "transformers' GGUF loader (pip install -e '.[convert]')")
    require_module("accelerate", "transformers' GGUF loader (pip install -e '.[convert]')")
    from mla_components.conversion import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        unavailable(str(e))


@pytest.fixture(scope="session")
def gguf_reference(gguf_path):
    """``(LlamaForCausalLM, tokenizer)`` as transformers loads the GGUF: the reference for every parity check."""
    from mla_components.conversion import load_gguf_with_transformers

    return load_gguf_with_transformers(gguf_path)


@pytest.fixture(scope="session")
def smollm2_origin(gguf_reference, gguf_path):
    from mla_components.conversion import origin_from_transformers

    model, tokenizer = gguf_reference
    return origin_from_transformers(model, tokenizer, source=gguf_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_origin):
    from mla_components.conversion import origin_model

    return origin_model(smollm2_origin)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_origin, tmp_path_factory) -> Path:
    from mla_components.conversion import write_origin

    return write_origin(smollm2_origin, tmp_path_factory.mktemp("smollm2") / "origin")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from mla_components.data import hf_tokenizer

    return hf_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def llama32_reference(smollm2_dir, tmp_path_factory):
    """``(directory, LlamaForCausalLM)``: a random Llama-3.2-1B-layout model saved by ``save_pretrained`` (config
    in transformers 5's ``rope_parameters`` form) with tokenizer files, and the model object itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama32") / "Llama-3.2-1B-2L"
    torch.manual_seed(0)
    model = randomize_hf_(LlamaForCausalLM(LlamaConfig(**LLAMA32_1B_LAYOUT))).eval()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(smollm2_dir / name, directory / name)
    assert "rope_parameters" in json.loads((directory / "config.json").read_text())
    return directory, model


# --- the 512 + 64 conversion of SmolLM2-135M-Instruct, run once per session through `tune run` ---
# Small calibration and held-out sets: the same method on ~1k calibration tokens (the shipped config uses 16k).
SMALL_CONVERSION = ("calibration.sequences=4", "calibration.seq_len=256", "heldout.sequences=2", "heldout.seq_len=256")


@pytest.fixture(scope="session")
def converted_512_run(smollm2_dir, tmp_path_factory):
    """``tune run mla_recipes/convert_to_mla.py --config configs/smollm2_135m/convert_mla_512.yaml`` on the origin's
    HF directory (``smollm2_dir``), small calibration; ``(output_dir, completed process, wall seconds)``.
    Shared by the recipe and serving tests (one conversion: about a minute on 2 cores)."""
    import subprocess
    import time

    from tests.training._tune import ENV, REPO, tune_command

    output = tmp_path_factory.mktemp("convert") / "mla_512"
    command = tune_command(
        "mla_recipes/convert_to_mla.py",
        "smollm2_135m/convert_mla_512.yaml",
        f"origin.source={smollm2_dir}",
        f"output_dir={output}",
        "origin_output_dir=null",  # the origin is smollm2_dir already (and the default path is in the repo)
        *SMALL_CONVERSION,
    )
    start = time.perf_counter()
    # one process: both cores (ENV's one thread per process is for 2-rank runs)
    env = {**ENV, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"tune run convert_to_mla failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return output, proc, seconds


@pytest.fixture(scope="session")
def converted_512_dir(converted_512_run) -> Path:
    """The converted HF DeepseekV3 directory (``output_dir/model``)."""
    return converted_512_run[0] / "model"
