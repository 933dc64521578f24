"""The conversion recipe (``mla_recipes/convert_to_mla.py``) as users run it: ``tune run`` (and ``mla-tune run``)
on SmolLM2-135M-Instruct writes a servable HF DeepseekV3 directory with the origin's tokenizer and a sane report;
bad inputs are refused with a message naming the field before any weight is read."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import mla_components.conversion.origin as origin_module
import mla_components.conversion.pipeline as pipeline
from mla_components.checkpointing import read_config
from mla_components.checkpointing._hf_format import read_safetensors
from mla_components.cli import configs_root, project_configs, tune_run_argv
from mla_components.models import SMOLLM2_135M_CONFIG
from tests.conversion.test_origin_errors import write_gguf
from tests.training._tune import ENV, REPO

CONFIG = "smollm2_135m/convert_mla_512"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
REFUSAL_SECONDS = 10  # a refusal reads config.json or a GGUF header only; loading the origin takes far longer


@pytest.mark.slow  # the session's conversion: about a minute on 2 cores
def test_tune_run_writes_a_deepseek_v3_directory_and_report(converted_512_run, smollm2_dir):
    output, proc, seconds = converted_512_run
    model = output / "model"
    config = read_config(model)
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["num_hidden_layers"]) == (512, 64, 30)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert (model / "model.safetensors").is_file()
    for name in TOKENIZER_FILES:  # the origin's tokenizer and chat template, byte for byte
        assert (model / name).read_bytes() == (smollm2_dir / name).read_bytes(), name

    report = json.loads((output / "conversion_report.json").read_text())
    print(f"tune run convert_to_mla: {seconds:.1f} s wall; report {json.dumps(report['heldout'])}")
    assert report["kv_lora_rank"] == 512 and report["qk_rope_head_dim"] == 64
    assert report["cache_values_per_token_and_layer"] == 576
    assert report["origin_cache_values_per_token_and_layer"] == 384
    assert report["exact_rope_frequencies"] is True  # 64 of 64: every origin frequency kept
    assert report["calibration_tokens"] == 4 * 256 and report["origin"] == str(smollm2_dir)
    assert report["calibration_source"] == "offline corpus, train split"
    assert pipeline.read_calibration_tokens(output / "calibration_tokens.safetensors", 49152).shape == (4, 256)
    assert len(report["layers"]) == 30
    heldout = report["heldout"]
    assert heldout["tokens"] == 2 * 255
    for key in ("perplexity_origin", "perplexity_converted"):
        assert math.isfinite(heldout[key]) and 1 < heldout[key] < 1000, heldout
    assert math.isfinite(heldout["kl_origin_to_converted"]) and heldout["kl_origin_to_converted"] > 0, heldout
    assert 0 < report["mean_rope_key_energy"] <= 1 and 0 < report["mean_latent_energy"] <= 1
    assert "ConvertToMLARecipe" in proc.stdout + proc.stderr  # Torchtune's config.log_config ran: the recipe did


@pytest.mark.slow  # a second small conversion: about a minute on 2 cores
def test_a_tokens_file_reruns_a_conversion_on_its_tokens_without_the_corpus(
    converted_512_run, smollm2_dir, tmp_path, monkeypatch
):
    """A run given the windows another run calibrated on (``calibration.tokens_file``) never reads the corpus's
    train split (it comes with Python, so it differs between Python versions) and writes the same weights: the
    base a delta (``mla_components.checkpointing.delta``) is made over can be rebuilt on any machine."""
    output, _, _ = converted_512_run
    tokens_file = output / "calibration_tokens.safetensors"
    upstream = pipeline.token_windows

    def heldout_only(tokenizer, split, *args, **kwargs):
        assert split != "train", "the train corpus was read although calibration.tokens_file was given"
        return upstream(tokenizer, split, *args, **kwargs)

    monkeypatch.setattr(pipeline, "token_windows", heldout_only)
    cfg = conversion_config(smollm2_dir, tmp_path / "again", origin_output_dir=None)
    cfg.calibration.tokens_file = str(tokens_file)
    cfg.heldout.sequences, cfg.heldout.seq_len = 2, 256
    report = pipeline.run_conversion(cfg)
    assert report["calibration_source"] == f"file {tokens_file}" and report["calibration_tokens"] == 4 * 256
    first, again = read_safetensors(output / "model"), read_safetensors(tmp_path / "again" / "model")
    assert set(first) == set(again)
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=1e-5, atol=1e-6, msg=name)
    rewritten = pipeline.read_calibration_tokens(tmp_path / "again" / "calibration_tokens.safetensors")
    assert torch.equal(rewritten, pipeline.read_calibration_tokens(tokens_file))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"calibration\.tokens_file .*missing\.safetensors does not exist"),
        (b"not a safetensors file", r"calibration\.tokens_file .* is not a safetensors file"),
        ({"tokens": torch.arange(10)}, r"one non-empty 2-D integer tensor 'tokens'"),
        ({"ids": torch.zeros(2, 8, dtype=torch.int32)}, r"one non-empty 2-D integer tensor 'tokens'"),
    ],
)
def test_a_bad_tokens_file_is_refused_before_any_weight(origin_config_dir, tmp_path, no_weights, content, message):
    path = tmp_path / ("missing.safetensors" if content is None else "tokens.safetensors")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        save_file(content, path)
    cfg = conversion_config(origin_config_dir, tmp_path / "out")
    cfg.calibration.tokens_file = str(path)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        pipeline.run_conversion(cfg)
    assert not (tmp_path / "out").exists()


def test_tokens_of_another_tokenizer_are_refused(tmp_path):
    path = pipeline.write_calibration_tokens(tmp_path / "t.safetensors", torch.full((2, 8), 60000), "test")
    with pytest.raises(ValueError, match=r"token ids outside \[0, 49152\): written for another tokenizer"):
        pipeline.read_calibration_tokens(path, 49152)


def test_mla_tune_resolves_the_convert_recipe_and_configs():
    for name in (CONFIG, "smollm2_135m/convert_mla_256"):
        assert project_configs()[name][0] == "mla_recipes/convert_to_mla.py"
        argv = tune_run_argv(["convert_to_mla", "--config", name, "origin.source=/m.gguf", "output_dir=/tmp/x"])
        config = str(configs_root() / f"{name}.yaml")
        assert argv == [
            "run",
            "mla_recipes/convert_to_mla.py",
            "--config",
            config,
            "origin.source=/m.gguf",
            "output_dir=/tmp/x",
        ]
    assert (configs_root() / f"{CONFIG}.yaml").resolve() == (REPO / "configs" / f"{CONFIG}.yaml").resolve()


@pytest.fixture
def origin_config_dir(tmp_path) -> Path:
    """An HF directory with SmolLM2-135M's config.json and tokenizer files but no weights: enough for every check
    that must come before the weights (reading them would fail)."""
    directory = tmp_path / "origin"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**SMOLLM2_135M_CONFIG, "model_type": "llama"}))
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weight is read, the origin is built or anything is written."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were touched before the conversion arguments were validated")

    for module, name in (
        (origin_module, "read_safetensors"),
        (origin_module, "load_gguf_with_transformers"),
        (pipeline, "origin_model"),
        (pipeline, "write_origin"),
        (pipeline, "write_hf_checkpoint"),
    ):
        monkeypatch.setattr(module, name, refuse)


def conversion_config(source, output_dir, **overrides):
    base = OmegaConf.load(REPO / "configs" / f"{CONFIG}.yaml")
    return OmegaConf.merge(base, {"origin": {"source": str(source)}, "output_dir": str(output_dir), **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"qk_rope_head_dim": 63}, r"qk_rope_head_dim must be even .*got 63"),
        ({"qk_rope_head_dim": 128}, r"qk_rope_head_dim=128 exceeds the origin's head dim \(64\)"),
        ({"qk_rope_head_dim": 0}, r"qk_rope_head_dim must be a positive integer, got 0"),
        ({"kv_lora_rank": 0}, r"kv_lora_rank must be a positive integer, got 0"),
        ({"kv_lora_rank": 1}, r"kv_lora_rank=1 is too small to carry both keys and values"),
    ],
)
def test_bad_ranks_are_refused_before_any_weight(origin_config_dir, tmp_path, no_weights, overrides, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        pipeline.run_conversion(conversion_config(origin_config_dir, tmp_path / "out", **overrides))
    assert time.perf_counter() - start < REFUSAL_SECONDS
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_refused_before_any_weight(origin_config_dir, tmp_path, no_weights):
    (origin_config_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"source: .*origin has no tokenizer\.json"):
        pipeline.run_conversion(conversion_config(origin_config_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_gguf_of_another_architecture_is_refused(tmp_path, no_weights, arch):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(ValueError, match=rf"source: .*{arch}\.gguf has general\.architecture '{arch}'"):
        pipeline.run_conversion(conversion_config(path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bundled_gguf_ranks_are_checked_from_its_header(gguf_path, tmp_path, no_weights):
    """``origin.source: null`` (the bundled 98 MB GGUF): the head dim comes from the header, in milliseconds."""
    start = time.perf_counter()
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{CONFIG}.yaml"), {"output_dir": str(tmp_path / "o")})
    cfg.qk_rope_head_dim = 96
    with pytest.raises(ValueError, match=r"qk_rope_head_dim=96 exceeds the origin's head dim \(64\)"):
        pipeline.run_conversion(cfg)
    assert time.perf_counter() - start < 1.0


def test_mla_tune_run_refuses_an_odd_rope_dim_in_seconds(origin_config_dir, tmp_path):
    """The whole user path: ``mla-tune run convert_to_mla --config smollm2_135m/convert_mla_512 ...`` exits non-zero
    with the field in the message, in the time it takes to start Python and Torchtune (the origin here has no
    weights at all, so reaching the weights would fail differently)."""
    mla_tune = str(Path(sys.executable).with_name("mla-tune"))
    command = [mla_tune, "run", "convert_to_mla", "--config", CONFIG, f"origin.source={origin_config_dir}"]
    command += [f"output_dir={tmp_path / 'out'}", "origin_output_dir=null", "qk_rope_head_dim=63"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    print(f"mla-tune run refusal: {seconds:.1f} s")
    assert proc.returncode != 0
    assert "qk_rope_head_dim must be even (RoPE rotates pairs), got 63" in proc.stderr + proc.stdout
    assert "ConvertToMLARecipe" in proc.stdout + proc.stderr  # it got as far as the recipe: resolution worked
    assert not (tmp_path / "out").exists()
    assert seconds < 60  # interpreter + Torchtune imports on a busy 2-core machine; a conversion takes minutes
