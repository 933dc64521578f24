"""State-dict key mapping between the MLA builders and HF DeepseekV3 (dense).

No permutation is needed: both sides store the rope dims as interleaved pairs (HF ``rope_interleave=True``).
"""

import re

import torch

# HF key -> Torchtune key; "{}" is the layer index.
_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_a_proj.weight": "layers.{}.attn.q_a_proj.weight",
    "model.layers.{}.self_attn.q_a_layernorm.weight": "layers.{}.attn.q_a_norm.scale",
    "model.layers.{}.self_attn.q_b_proj.weight": "layers.{}.attn.q_b_proj.weight",
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight": "layers.{}.attn.kv_a_proj.weight",
    "model.layers.{}.self_attn.kv_a_layernorm.weight": "layers.{}.attn.kv_a_norm.scale",
    "model.layers.{}.self_attn.kv_b_proj.weight": "layers.{}.attn.kv_b_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
}
_TO_HF = {v: k for k, v in _FROM_HF.items()}


def _mapped(key: str, table: dict[str, str], direction: str) -> str:
    match = re.search(r"\.(\d+)\.", key)
    pattern = key.replace(f".{match.group(1)}.", ".{}.", 1) if match else key
    if pattern not in table:
        raise ValueError(f"{direction}: unknown state-dict key {key!r} (not part of a dense MLA model)")
    return table[pattern].format(match.group(1)) if match else table[pattern]


def mla_hf_to_tune(state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF DeepseekV3 keys -> MLA builder keys. ``lm_head.weight`` is dropped for tied models."""
    out = {}
    for key, value in state_dict.items():
        if tie_word_embeddings and key == "lm_head.weight":
            continue
        out[_mapped(key, _FROM_HF, "HF -> torchtune")] = value
    return out


def mla_tune_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MLA builder keys -> HF DeepseekV3 keys (a tied model has no ``output.weight``, so no ``lm_head``)."""
    return {_mapped(key, _TO_HF, "torchtune -> HF"): value for key, value in state_dict.items()}
