"""Origin-model builders: the RoPE each config asks for, tying, sizes, and the CLI that writes an origin."""

import json

import pytest
import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings, TiedLinear

from mla_components.checkpointing import AtomicHFCheckpointer
from mla_components.conversion.origin import main
from mla_components.models import SMOLLM2_135M_CONFIG, llama_from_hf_config, smollm2_135m

TINY = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
TINY.update(num_hidden_layers=2, vocab_size=64, max_position_embeddings=128, rope_theta=1e4)


def test_smollm2_135m_builder():
    with torch.device("meta"):
        model = smollm2_135m()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    rope = model.layers[0].attn.pos_embeddings
    assert type(rope) is RotaryPositionalEmbeddings and rope.base == 100_000.0  # plain RoPE, no Llama-3 scaling
    assert isinstance(model.output, TiedLinear)
    assert model.layers[0].attn.num_kv_heads == 3 and model.layers[0].attn.head_dim == 64
    assert model.hf_config == {**SMOLLM2_135M_CONFIG, "max_position_embeddings": 8192}


def test_rope_follows_the_config():
    scaled = dict(TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0})
    scaled["rope_scaling"].update(high_freq_factor=4.0, original_max_position_embeddings=64)
    rope = llama_from_hf_config(scaled).layers[0].attn.pos_embeddings
    assert isinstance(rope, Llama3ScaledRoPE) and (rope.scale_factor, rope.old_context_len) == (8.0, 64)
    assert type(llama_from_hf_config(TINY).layers[0].attn.pos_embeddings) is RotaryPositionalEmbeddings
    with pytest.raises(ValueError, match=r"rope_type 'linear' is not supported"):
        llama_from_hf_config(dict(TINY, rope_scaling={"type": "linear", "factor": 2.0}))
    untied = llama_from_hf_config(TINY)  # HF LlamaConfig's default: untied
    assert not isinstance(untied.output, TiedLinear) and untied.hf_config["tie_word_embeddings"] is False


def test_cli_writes_an_origin_the_checkpointer_loads(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "src"
    config = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tokenizer.save(str(source / "tokenizer.json"))
    main(["--source", str(source), "--output", str(tmp_path / "origin")])
    assert "wrote" in capsys.readouterr().out
    written = json.loads((tmp_path / "origin" / "config.json").read_text())
    assert written["rope_theta"] == 1e4 and written["rope_scaling"] is None and "rope_parameters" not in written
    state = AtomicHFCheckpointer(str(tmp_path / "origin"), str(tmp_path / "out")).load_checkpoint()["model"]
    keys = llama_from_hf_config(written).load_state_dict(state, strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys and "output.weight" in state


def test_smollm2_135m_yarn_control_has_the_mla_runs_attention_temperature():
    """The GQA control of a YaRN-extended MLA model: YaRN over all head dims, whose cos/sin factor squared equals
    the MLA softmax-scale factor of DeepSeek's ``mscale = mscale_all_dim = 1`` settings at the same ``factor``."""
    from mla_components.modules import DecoupledRotaryEmbedding
    from mla_components.modules.rope import mla_softmax_scale

    gqa_yarn = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192}
    mla_yarn = {**gqa_yarn, "mscale": 1.0, "mscale_all_dim": 1.0}
    with torch.device("meta"):
        model = smollm2_135m(max_seq_len=131_072, rope_scaling=gqa_yarn)
    rope = model.layers[0].attn.pos_embeddings
    assert isinstance(rope, DecoupledRotaryEmbedding) and model.max_seq_len == 131_072
    assert model.hf_config["rope_scaling"] == gqa_yarn
    mla_factor = mla_softmax_scale(128, mla_yarn) / 128**-0.5
    assert rope.attention_factor**2 == pytest.approx(mla_factor) and mla_factor == pytest.approx(1.2773**2, rel=1e-4)
    with pytest.raises(ValueError, match=r"model.rope_scaling.original_max_position_embeddings is required"):
        smollm2_135m(rope_scaling={"rope_type": "yarn", "factor": 16.0})
