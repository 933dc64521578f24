"""A Llama origin with YaRN RoPE (the GQA control of a YaRN-extended MLA model) against transformers' Llama."""

import torch

from mla_components.models import llama_from_hf_config
from tests._requirements import require_module
from tests.conversion.conftest import randomize_hf_


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@torch.no_grad()
def test_yarn_origin_matches_transformers_past_the_original_context():
    require_module("transformers", "the reference implementation (pip install -e '.[dev]')")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    hf_config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10_000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_scaling=yarn,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = randomize_hf_(LlamaForCausalLM(LlamaConfig(**hf_config))).eval()
    ours_config = {**hf_config, "model_type": "llama", "rope_scaling": yarn}
    with torch.device("meta"):
        model = llama_from_hf_config(ours_config, max_seq_len=1024)
    from torchtune.models import convert_weights

    state = convert_weights.hf_to_tune(
        {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"},
        num_heads=4, num_kv_heads=2, dim=64, head_dim=16,
    )  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(700, 732).expand(2, -1)  # past the original 256 positions
    theirs = reference(ids, position_ids=positions).logits
    assert isinstance(reference.model.rotary_emb, LlamaRotaryEmbedding)
    assert rel_error(model(ids, input_pos=positions), theirs) <= 1e-4
    # the same weights with plain RoPE differ: the check has teeth
    with torch.device("meta"):
        plain = llama_from_hf_config({**ours_config, "rope_scaling": None}, max_seq_len=1024)
    plain.load_state_dict(model.state_dict(), assign=True)
    for module in plain.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    assert rel_error(plain(ids, input_pos=positions), theirs) > 1e-2
