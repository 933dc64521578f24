"""Latent KV cache for MLA: stores only ``c_kv`` and ``k_pe``, never per-head keys or values."""

import torch
from torch import nn


class MLAKVCache(nn.Module):
    """KV cache of Multi-Head Latent Attention, with the members of Torchtune's ``KVCache``.

    One buffer ``cache`` of shape ``[b, max_seq_len, kv_lora_rank + rope_dim]`` holds, per token, the normalised
    latent ``c_kv`` followed by the rotated shared key ``k_pe`` (576 values per token for DeepSeek-V3's
    512 + 64), so a decode kernel streams one contiguous row per token. ``c_kv`` and ``k_pe`` are views into it.

    Args:
        batch_size (int): batch size the cache is set up for.
        max_seq_len (int): maximum number of cached tokens.
        kv_lora_rank (int): latent width ``d_c``.
        rope_dim (int): width of the decoupled rope key ``d_r``.
        dtype (torch.dtype): cache dtype.
    """

    def __init__(self, batch_size: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype):
        super().__init__()
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.batch_size = batch_size
        self.register_buffer(
            "cache",
            torch.zeros(batch_size, max_seq_len, kv_lora_rank + rope_dim, dtype=dtype),
            persistent=False,
        )
        # Same compile-friendly position bookkeeping as torchtune.modules.KVCache.
        self.register_buffer("cache_pos", torch.arange(0, max_seq_len), persistent=False)

    @property
    def c_kv(self) -> torch.Tensor:
        """Normalised latents ``[b, max_seq_len, kv_lora_rank]`` (a strided view)."""
        return self.cache[..., : self.kv_lora_rank]

    @property
    def k_pe(self) -> torch.Tensor:
        """Rotated shared rope keys ``[b, max_seq_len, rope_dim]`` (a strided view)."""
        return self.cache[..., self.kv_lora_rank :]

    @property
    def max_seq_len(self) -> int:
        return self.cache.shape[1]

    @property
    def size(self) -> int:
        """Number of positions filled so far."""
        return self.cache_pos[0].item()

    def reset(self) -> None:
        """Zero the cache and rewind to position 0."""
        self.cache.zero_()
        self.cache_pos -= self.size

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``c_kv [b, s, kv_lora_rank]`` and ``k_pe [b, s, rope_dim]`` at the next ``s`` positions.

        Returns:
            The whole cache as ``(c_kv [b, max_seq_len, kv_lora_rank], k_pe [b, max_seq_len, rope_dim])``.
        """
        bsz, seq_len, _ = c_kv.shape
        if bsz > self.cache.shape[0]:
            raise ValueError(f"The cache was set up for batch size {self.cache.shape[0]}, but got a batch of {bsz}")
        assert (self.cache_pos[0] + seq_len) <= self.max_seq_len, "MLA KV cache overflow: raise max_seq_len"
        positions = self.cache_pos[:seq_len]
        self.cache[:bsz, positions, : self.kv_lora_rank] = c_kv
        self.cache[:bsz, positions, self.kv_lora_rank :] = k_pe
        self.cache_pos.add_(seq_len)
        return self.c_kv, self.k_pe
