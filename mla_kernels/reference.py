"""PyTorch references for the MLA decode kernel (tests and benchmarks; the model's own PyTorch decode path is
``mla_components.modules.attention.absorbed_attention_torch``).

- :func:`mla_decode_reference`: the exact semantics of :func:`mla_kernels.mla_decode.mla_decode` (per-row lengths,
  paged caches, key masks, ``lse``), computed row by row in the inputs' dtype promoted to ``compute_dtype``
  (fp64 in the tests).
- :func:`naive_decode_torch`: decompress the latent into per-head K/V with ``kv_b_proj``'s weight, then SDPA —
  the seed's baseline (what the expanded training path costs if used for decoding).
"""

import torch
import torch.nn.functional as F

from mla_kernels.fp8 import dequantize_latent_fp8


def gather_sequence(
    cache: torch.Tensor, seq: int, length: int, block_table: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens ``0 .. length-1`` of sequence ``seq``: ``[length, d]`` from a contiguous ``[B, T, d]`` cache or a
    paged ``[num_blocks, page_size, d]`` one addressed through ``block_table [B, max_blocks]``."""
    if block_table is None:
        return cache[seq, :length]
    page_size = cache.shape[1]
    tok = torch.arange(length, device=cache.device)
    pages = block_table[seq, tok // page_size].long()
    return cache[pages, tok % page_size]


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    c_kv_scale: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``mla_decode`` (``out [R, H, d_c]`` in ``compute_dtype``, ``lse [R, H]``).

    With ``c_kv_scale`` the e4m3 latent is dequantised (in fp32, then widened to ``compute_dtype``) first."""
    if c_kv_scale is not None:
        c_kv = dequantize_latent_fp8(c_kv, c_kv_scale, torch.float32)
    rows, num_heads, d_c = q_latent.shape
    batch = block_table.shape[0] if block_table is not None else c_kv.shape[0]
    per_seq = rows // batch
    out = torch.zeros(rows, num_heads, d_c, dtype=compute_dtype, device=q_latent.device)
    lse = torch.full((rows, num_heads), float("-inf"), dtype=compute_dtype, device=q_latent.device)
    mask_rows = None if key_mask is None else key_mask.reshape(rows, key_mask.shape[-1])
    for r in range(rows):
        seq, length = r // per_seq, int(seq_lens[r])
        keys_c = gather_sequence(c_kv, seq, length, block_table).to(compute_dtype)
        keys_r = gather_sequence(k_pe, seq, length, block_table).to(compute_dtype)
        scores = (q_latent[r].to(compute_dtype) @ keys_c.T + q_pe[r].to(compute_dtype) @ keys_r.T) * softmax_scale
        if mask_rows is not None:
            scores = scores.masked_fill(~mask_rows[r, :length], float("-inf"))
        if length == 0 or not torch.isfinite(scores).any():
            continue
        lse[r] = torch.logsumexp(scores, dim=-1)
        out[r] = torch.softmax(scores, dim=-1) @ keys_c
    return out, lse


def naive_decode_torch(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    kv_b_weight: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Decompress + SDPA: ``q_nope [b, 1, H, d_n]``, ``q_pe [b, 1, H, d_r]``, ``c_kv [b, t, d_c]``,
    ``k_pe [b, t, d_r]``, ``kv_b_weight [H * (d_n + d_v), d_c]`` -> ``[b, 1, H, d_v]`` (all t keys attended)."""
    b, t, _ = c_kv.shape
    num_heads, d_n = q_nope.shape[2], q_nope.shape[3]
    kv = F.linear(c_kv, kv_b_weight).view(b, t, num_heads, -1)
    k_nope, v = kv.split([d_n, kv.shape[-1] - d_n], dim=-1)
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, num_heads, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2)
