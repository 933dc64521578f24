"""Shared fixtures for the model tests: small MLA configs and randomised weights."""

import pytest
import torch

from mla_components.models import MLAConfig

YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}


def small_config(**overrides) -> MLAConfig:
    """A few-layer MLA config with distinct dims everywhere (nope != rope != v, latent != d) to catch mix-ups."""
    base = dict(
        vocab_size=97,
        num_layers=2,
        num_heads=3,
        embed_dim=48,
        intermediate_dim=80,
        max_seq_len=256,
        q_lora_rank=24,
        kv_lora_rank=40,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        rope_base=10_000.0,
        rope_scaling=None,
        norm_eps=1e-6,
        tie_word_embeddings=False,
        kernel_backend="torch",
    )
    base.update(overrides)
    return MLAConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: N(0, 0.1) matrices and norm scales around 1, so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale") or name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def yarn():
    return dict(YARN)
