"""The FP8 latent cache's format (FlashMLA's), shared by the decode kernel and the model's KV cache: e4m3 values
with one fp32 scale per ``FP8_GROUP_SIZE`` values of each token, ``scale = amax / 448``.

- :func:`quantize_latent_fp8` / :func:`dequantize_latent_fp8`: the format in PyTorch (the kernel dequantises the
  same way in its loads).
- :func:`fp8_row_views`: the three views of one packed row per token (FlashMLA's 656 bytes for 512 + 64).
"""

import torch

FP8_GROUP_SIZE = 128  # latent values per fp32 scale (FlashMLA: 4 scales for d_c = 512)
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_latent_fp8(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-group e4m3 quantisation: ``c_kv [..., d_c]`` -> ``(float8_e4m3fn [..., d_c],
    fp32 scales [..., d_c / FP8_GROUP_SIZE])`` with ``scale = amax(|group|) / 448``, so each group's largest value
    maps to e4m3's largest finite value (an all-zero group gets scale 1)."""
    d_c = c_kv.shape[-1]
    if d_c % FP8_GROUP_SIZE:
        raise ValueError(f"the latent width ({d_c}) must be a multiple of {FP8_GROUP_SIZE} for fp8 scale groups")
    groups = c_kv.float().unflatten(-1, (d_c // FP8_GROUP_SIZE, FP8_GROUP_SIZE))
    scale = groups.abs().amax(dim=-1) / FP8_E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # x / scale can land a rounding step above 448, where the cast would give NaN (e4m3fn has no inf)
    values = (groups / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return values.flatten(-2), scale


def dequantize_latent_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``float8_e4m3fn [..., d_c]`` and fp32 ``scale [..., d_c / FP8_GROUP_SIZE]`` -> ``[..., d_c]`` in ``dtype``
    (the product is taken in fp32, as the kernel does in registers)."""
    groups = values.float().unflatten(-1, (scale.shape[-1], values.shape[-1] // scale.shape[-1]))
    return (groups * scale.float()[..., None]).flatten(-2).to(dtype)


def fp8_row_views(rows: torch.Tensor, d_c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed uint8 rows ``[..., d_c + 4 * d_c / FP8_GROUP_SIZE + 2 * d_r]`` (e4m3 latent, fp32 group scales, bf16
    rope key, as ``MLAKVCache`` stores them) -> strided views ``(c_kv e4m3 [..., d_c], c_kv_scale fp32
    [..., d_c / FP8_GROUP_SIZE], k_pe bf16 [..., d_r])``."""
    rope = d_c + 4 * (d_c // FP8_GROUP_SIZE)
    return (
        rows[..., :d_c].view(torch.float8_e4m3fn),
        rows[..., d_c:rope].view(torch.float32),
        rows[..., rope:].view(torch.bfloat16),
    )
