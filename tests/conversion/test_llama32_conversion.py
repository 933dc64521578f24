"""The shipped Llama-3.2-1B config (``configs/llama3_2_1b/convert_mla_512.yaml``) on a randomly initialised HF Llama
directory with Llama-3.2-1B's attention layout (hidden 2048, 32 query / 8 KV heads of 64, theta 500000, llama3 rope
scaling, tied embeddings) at 2 layers and a small FFN and vocabulary: the config as shipped, with only the origin,
output, device and calibration size overridden, writes an HF DeepseekV3 directory transformers loads and a report
with the 576-vs-1024 cache numbers; without ``origin.source`` it stops naming that field before any weight loads."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import mla_components.conversion.pipeline as pipeline
from tests.conversion.conftest import LLAMA32_1B_LAYOUT, randomize_hf_
from tests.training._tune import ENV, REPO, tune_command

CONFIG = "llama3_2_1b/convert_mla_512"
VOCAB = 4096
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 = the layout's bos 1 / eos 2
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# CPU-sized: 2 layers (the layout's), FFN 256 instead of 8192; the attention is Llama-3.2-1B's
LAYOUT = {**LLAMA32_1B_LAYOUT, "intermediate_size": 256, "vocab_size": VOCAB}
SMALL = {"calibration": {"sequences": 4, "seq_len": 128}, "heldout": {"sequences": 4, "seq_len": 128}}


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE of ``VOCAB`` ids trained on the offline corpus (the calibration text), so every token id the
    conversion feeds the origin is < vocab_size, plus a ChatML ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mla_components.data import corpus_texts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts("train"), trainer)
    assert tokenizer.get_vocab_size() <= VOCAB and [tokenizer.token_to_id(t) for t in SPECIAL] == [0, 1, 2]
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": LAYOUT["max_position_embeddings"],
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="module")
def llama32_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama32") / "Llama-3.2-1B-2L"
    torch.manual_seed(0)
    randomize_hf_(LlamaForCausalLM(LlamaConfig(**LAYOUT))).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def shipped_config(**overrides):
    return OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{CONFIG}.yaml"), overrides)


@pytest.fixture(scope="module")
def conversion(llama32_dir, tmp_path_factory):
    """``(output_dir, report)`` of the shipped config on ``llama32_dir``, on CPU with 4 x 128 calibration tokens."""
    output = tmp_path_factory.mktemp("convert") / "mla_512"
    cfg = shipped_config(origin={"source": str(llama32_dir)}, output_dir=str(output), device="cpu", **SMALL)
    report = pipeline.run_conversion(cfg)
    assert json.loads((output / pipeline.REPORT_NAME).read_text())["heldout"] == report["heldout"]
    return output, report


def test_shipped_config_values():
    cfg = OmegaConf.load(REPO / "configs" / f"{CONFIG}.yaml")
    assert OmegaConf.is_missing(cfg.origin, "source")  # required: no default (the bundled SmolLM2 is not Llama)
    assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.norm_stabilizer_dims) == (512, 64, 32)
    assert cfg.max_seq_len == 131_072 and cfg.origin_output_dir is None
    assert (cfg.calibration.sequences, cfg.calibration.seq_len, cfg.heldout.sequences, cfg.heldout.seq_len) == (
        64,
        512,
        16,
        512,
    )


def test_report_cache_sizes_and_rope(conversion):
    _, report = conversion
    assert report["cache_values_per_token_and_layer"] == 512 + 64 == 576
    assert report["origin_cache_values_per_token_and_layer"] == 2 * 8 * 64 == 1024
    # llama3 frequency scaling has no DeepSeek-V3 equivalent: the converted rope is the unscaled one
    assert report["exact_rope_frequencies"] is False
    assert report["calibration_tokens"] == 4 * 128
    heldout = report["heldout"]
    assert heldout["tokens"] == 4 * 127
    for key in ("perplexity_origin", "perplexity_converted", "kl_origin_to_converted"):
        assert math.isfinite(heldout[key]), (key, heldout)
    assert heldout["kl_origin_to_converted"] >= 0.0
    assert len(report["layers"]) == LAYOUT["num_hidden_layers"]


def test_output_is_a_deepseek_v3_directory_transformers_loads(conversion):
    from transformers import DeepseekV3ForCausalLM

    output, _ = conversion
    model_dir = output / pipeline.MODEL_SUBDIR
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["num_attention_heads"]) == (512, 64, 32)
    assert (config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]) == (2048, VOCAB, 2)
    assert (model_dir / "tokenizer.json").is_file()
    model, info = DeepseekV3ForCausalLM.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(tokens).logits
    assert logits.shape == (1, 16, VOCAB) and torch.isfinite(logits).all()


def test_missing_source_is_refused_naming_it_before_any_weight(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the origin was read although origin.source is unset")

    monkeypatch.setattr(pipeline, "load_origin", no_weights)
    monkeypatch.setattr(pipeline, "origin_attention_shape", no_weights)
    cfg = shipped_config(output_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(MissingMandatoryValue, match=r"origin\.source"):
        pipeline.run_conversion(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_source_through_tune_run(tmp_path):
    command = tune_command("mla_recipes/convert_to_mla.py", f"{CONFIG}.yaml", f"output_dir={tmp_path / 'out'}")
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Missing mandatory value: origin.source" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
