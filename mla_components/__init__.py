"""InfiniteContext-1B: DeepSeek-V3 Multi-Head Latent Attention for Torchtune."""

from mla_components.models import gqa_1b, gqa_tiny, mha_1b, mla_1b, mla_tiny

__all__ = ["gqa_1b", "gqa_tiny", "mha_1b", "mla_1b", "mla_tiny"]
