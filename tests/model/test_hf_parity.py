"""Numerical parity with HF transformers' DeepseekV3ForCausalLM (dense config), which nobody here wrote."""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from mla_components.models import mla, mla_hf_to_tune, mla_tune_to_hf
from mla_components.models._config import MLAConfig

from .conftest import YARN, randomize_, small_config


def hf_model_for(config: MLAConfig) -> DeepseekV3ForCausalLM:
    hf_config = DeepseekV3Config(**config.to_hf_config(), attn_implementation="eager")
    return DeepseekV3ForCausalLM(hf_config).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q_lora", "q_full"])
@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_hf_deepseek_v3(q_lora_rank, rope_scaling, tied):
    torch.manual_seed(0)
    config = small_config(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling, tie_word_embeddings=tied)
    ours = randomize_(mla(config)).eval()
    hf = hf_model_for(config)
    missing, unexpected = hf.load_state_dict(mla_tune_to_hf(ours.state_dict()), strict=False)
    assert not unexpected
    # a tied HF model reports lm_head as missing only because it is the embedding
    assert missing == (["lm_head.weight"] if tied else [])
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr() or not tied

    # long enough to reach past YaRN's original 64 positions
    tokens = torch.randint(0, config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_weights_round_trip_through_hf_names():
    config = small_config()
    ours = randomize_(mla(config))
    back = mla_hf_to_tune(mla_tune_to_hf(ours.state_dict()), tie_word_embeddings=False)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_hf_config_round_trip(yarn):
    config = small_config(rope_scaling=yarn)
    hf_dict = config.to_hf_config()
    assert hf_dict["first_k_dense_replace"] == config.num_layers
    assert isinstance(hf_dict["n_routed_experts"], int)
    assert hf_dict["rope_interleave"] is True
    assert MLAConfig.from_hf_config(hf_dict, kernel_backend="torch") == config
    # and what transformers itself writes back (rope_parameters in transformers 5) reads the same
    saved = DeepseekV3Config(**hf_dict).to_dict()
    assert MLAConfig.from_hf_config(saved, kernel_backend="torch") == config


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises(ValueError, match="layers.0.attn.wq.weight"):
        mla_tune_to_hf({"layers.0.attn.wq.weight": torch.zeros(1)})
