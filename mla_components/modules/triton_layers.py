"""Drop-in Triton-backed modules for ``kernel_backend="triton"``: Torchtune's RMSNorm and the decoupled RoPE with
the same parameters, buffers and numerics, whose forward (and backward) run the kernels of ``mla_kernels``.

Importing this module imports Triton; :func:`mla_components.modules.backend.norm_and_rope_classes` imports it only
for the ``triton`` backend.
"""

import torch
from torch import nn

from mla_components.modules.rope import DecoupledRotaryEmbedding
from mla_kernels.rms_norm import rms_norm
from mla_kernels.rope import apply_interleaved_rope


class TritonRMSNorm(nn.Module):
    """Drop-in for ``torchtune.modules.RMSNorm`` (same ``scale`` parameter, so state dicts load unchanged).

    Args:
        dim (int): normalised (last) dim.
        eps (float): added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.normalized_shape = (dim,)
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., dim] -> [..., dim]``."""
        return rms_norm(x, self.scale, self.eps)


class TritonDecoupledRotaryEmbedding(DecoupledRotaryEmbedding):
    """``DecoupledRotaryEmbedding`` (same YaRN frequencies, same cache) whose forward runs the Triton kernel.

    ``forward(x [b, s, n_h, d], *, input_pos [b, s] | [s] | None) -> [b, s, n_h, d]`` in ``x``'s dtype, with
    Torchtune's numerics (fp32 rotation, cast back).
    """

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        seq_len = x.size(1)
        rope_cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        rope_cache = rope_cache.view(-1, seq_len, self.dim // 2, 2)
        return apply_interleaved_rope(x, rope_cache[..., 0], rope_cache[..., 1])
