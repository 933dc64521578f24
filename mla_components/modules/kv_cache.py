"""Latent KV cache for MLA: stores only ``c_kv`` and ``k_pe``, never per-head keys or values."""

import torch
from torch import nn

from mla_kernels.fp8 import FP8_GROUP_SIZE, dequantize_latent_fp8, quantize_latent_fp8

# "bf16": the latent unquantised, in the dtype given to ``setup_caches`` (bf16 in every bf16 run; fp32 CPU runs keep
# fp32); "fp8_e4m3": FlashMLA's layout, e4m3 latent with one fp32 scale per 128 values and the rope key in bf16.
KV_CACHE_DTYPES = ("bf16", "fp8_e4m3")


def validate_kv_cache_dtype(kv_cache_dtype: str, kv_lora_rank: int) -> None:
    """Raise ``ValueError`` naming the field for an unknown cache dtype, or an fp8 latent that does not split into
    whole scale groups of ``FP8_GROUP_SIZE`` values."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (the rope key is never stored in fp8), "
            f"got {kv_cache_dtype!r}"
        )
    if kv_cache_dtype == "fp8_e4m3" and kv_lora_rank % FP8_GROUP_SIZE:
        raise ValueError(
            f"kv_lora_rank ({kv_lora_rank}) must be a multiple of {FP8_GROUP_SIZE} with kv_cache_dtype='fp8_e4m3' "
            f"(one fp32 scale per {FP8_GROUP_SIZE} latent values)"
        )


def causal_cache_mask(start: int, length: int, cache_len: int, device: torch.device) -> torch.Tensor:
    """``[1, length, cache_len]`` boolean mask for queries at positions ``start .. start + length - 1`` over a KV
    cache of ``cache_len`` slots: each sees the cached positions up to and including its own (the mask Torchtune's
    ``generate`` slices from its causal mask over the cache)."""
    keys = torch.arange(cache_len, device=device)
    queries = torch.arange(start, start + length, device=device)
    return (keys[None, :] <= queries[:, None]).unsqueeze(0)


class MLAKVCache(nn.Module):
    """KV cache of Multi-Head Latent Attention, with the members of Torchtune's ``KVCache``.

    One buffer ``cache`` holds one contiguous row per token, so a decode kernel streams one row per token:

    - ``kv_cache_dtype="bf16"`` (unquantised): ``[b, max_seq_len, kv_lora_rank + rope_dim]`` in ``dtype``, the
      normalised latent ``c_kv`` followed by the rotated shared key ``k_pe`` (576 values for DeepSeek-V3's 512 + 64);
    - ``kv_cache_dtype="fp8_e4m3"`` (FlashMLA's layout): ``[b, max_seq_len, row_bytes]`` uint8 holding the latent in
      float8_e4m3fn, one fp32 scale per ``FP8_GROUP_SIZE`` latent values, then ``k_pe`` in bf16
      (``512 + 4 * 4 + 64 * 2 = 656`` bytes for 512 + 64, against 1,152 in bf16).

    ``c_kv``, ``c_kv_scale`` and ``k_pe`` are strided views into the buffer.

    Args:
        batch_size (int): batch size the cache is set up for.
        max_seq_len (int): maximum number of cached tokens.
        kv_lora_rank (int): latent width ``d_c``.
        rope_dim (int): width of the decoupled rope key ``d_r``.
        dtype (torch.dtype): the model's dtype: the unquantised cache's dtype, and what an fp8 cache dequantises to.
        kv_cache_dtype (str): ``"bf16"`` or ``"fp8_e4m3"``.

    Raises:
        ValueError: naming the field, for an unknown ``kv_cache_dtype``, an fp8 ``kv_lora_rank`` that is not a
            multiple of ``FP8_GROUP_SIZE``, or an fp8 ``dtype`` (that would store the rope key in fp8).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "bf16",
    ):
        super().__init__()
        validate_kv_cache_dtype(kv_cache_dtype, kv_lora_rank)
        if dtype.is_floating_point and dtype.itemsize == 1:  # any float8
            raise ValueError(
                f"setup_caches dtype {dtype} would store the rope key (and unscaled latents) in fp8: pass the model's "
                "dtype and set kv_cache_dtype='fp8_e4m3' (e4m3 latent with per-group scales, rope key in bf16)"
            )
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.batch_size = batch_size
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype
        if kv_cache_dtype == "fp8_e4m3":
            self._scale_offset = kv_lora_rank  # bytes: e4m3 latent, then the scales, then the bf16 rope key
            self._rope_offset = kv_lora_rank + 4 * (kv_lora_rank // FP8_GROUP_SIZE)
            shape, storage_dtype = (batch_size, max_seq_len, self._rope_offset + 2 * rope_dim), torch.uint8
        else:
            shape, storage_dtype = (batch_size, max_seq_len, kv_lora_rank + rope_dim), dtype
        self.register_buffer("cache", torch.zeros(*shape, dtype=storage_dtype), persistent=False)
        # Same compile-friendly position bookkeeping as torchtune.modules.KVCache.
        self.register_buffer("cache_pos", torch.arange(0, max_seq_len), persistent=False)

    @property
    def quantized(self) -> bool:
        return self.kv_cache_dtype == "fp8_e4m3"

    @property
    def c_kv(self) -> torch.Tensor:
        """Normalised latents ``[b, max_seq_len, kv_lora_rank]`` (a strided view; float8_e4m3fn when quantised)."""
        if self.quantized:
            return self.cache[..., : self._scale_offset].view(torch.float8_e4m3fn)
        return self.cache[..., : self.kv_lora_rank]

    @property
    def c_kv_scale(self) -> torch.Tensor | None:
        """fp32 scales ``[b, max_seq_len, kv_lora_rank / FP8_GROUP_SIZE]`` of the e4m3 latent (None unquantised)."""
        if not self.quantized:
            return None
        return self.cache[..., self._scale_offset : self._rope_offset].view(torch.float32)

    @property
    def k_pe(self) -> torch.Tensor:
        """Rotated shared rope keys ``[b, max_seq_len, rope_dim]`` (a strided view; bf16 when quantised)."""
        if self.quantized:
            return self.cache[..., self._rope_offset :].view(torch.bfloat16)
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

    def dequantized(self, batch: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions (all when None) of the first ``batch`` sequences in ``dtype``:
        ``(c_kv [batch, length, kv_lora_rank], k_pe [batch, length, rope_dim])`` (views when unquantised)."""
        end = self.max_seq_len if length is None else length
        if not self.quantized:
            return self.c_kv[:batch, :end], self.k_pe[:batch, :end]
        c_kv = dequantize_latent_fp8(self.c_kv[:batch, :end], self.c_kv_scale[:batch, :end], self.dtype)
        return c_kv, self.k_pe[:batch, :end].to(self.dtype)

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``c_kv [b, s, kv_lora_rank]`` and ``k_pe [b, s, rope_dim]`` at the next ``s`` positions (an fp8
        cache quantises the latent here and rounds ``k_pe`` to bf16).

        Returns:
            The whole cache as ``(c_kv [b, max_seq_len, kv_lora_rank], k_pe [b, max_seq_len, rope_dim])``, the
            stored views (e4m3 and bf16 when quantised; :attr:`c_kv_scale` holds the scales).
        """
        bsz, seq_len, _ = c_kv.shape
        if bsz > self.cache.shape[0]:
            raise ValueError(f"The cache was set up for batch size {self.cache.shape[0]}, but got a batch of {bsz}")
        if not (self.cache.is_cuda and torch.cuda.is_current_stream_capturing()):  # a host read; capture forbids it
            assert (self.cache_pos[0] + seq_len) <= self.max_seq_len, "MLA KV cache overflow: raise max_seq_len"
        positions = self.cache_pos[:seq_len]
        if self.quantized:  # written as bytes: index_put has no float8 kernels on every device
            values, scale = quantize_latent_fp8(c_kv)
            rope = k_pe.to(torch.bfloat16).contiguous()
            row = [values.view(torch.uint8), scale.view(torch.uint8), rope.view(torch.uint8)]
            self.cache[:bsz, positions] = torch.cat(row, dim=-1)
        else:
            self.cache[:bsz, positions, : self.kv_lora_rank] = c_kv
            self.cache[:bsz, positions, self.kv_lora_rank :] = k_pe
        self.cache_pos.add_(seq_len)
        return self.c_kv, self.k_pe
