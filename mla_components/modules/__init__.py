"""Building blocks of the MLA model family (attention, decoupled RoPE, latent KV cache)."""

from mla_components.modules.attention import MultiHeadLatentAttention
from mla_components.modules.kv_cache import MLAKVCache
from mla_components.modules.rope import DecoupledRotaryEmbedding, mla_softmax_scale, yarn_get_mscale

__all__ = [
    "DecoupledRotaryEmbedding",
    "MLAKVCache",
    "MultiHeadLatentAttention",
    "mla_softmax_scale",
    "yarn_get_mscale",
]
