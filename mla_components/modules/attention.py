"""Multi-Head Latent Attention (DeepSeek-V2/V3) with Torchtune's attention interface.

Notation (docstrings and comments): b batch, s_x query length, s_y key length, n_h heads, d model dim,
d_c = kv_lora_rank (latent), d_r = qk_rope_head_dim, d_n = qk_nope_head_dim, d_v = v_head_dim.

Two ways to compute the same function:
- expanded (training, and any call without a cache): ``kv_b_proj`` decompresses the latent into per-head keys and
  values, then scaled-dot-product attention over ``q = [q_nope, q_pe]`` and ``k = [k_nope, k_pe]``;
- absorbed (cached decode: at most ``TRITON_DECODE_MAX_QUERIES`` new tokens per call with the cache enabled):
  ``W_UK`` is folded into the query, scores are taken directly against the cached latent, and ``W_UV`` is applied
  after attention, so per-head K/V are never materialised (DeepSeek-V3 ``inference/model.py``,
  ``attn_impl="absorb"``). Longer cached calls (chunked prefill) write the latent to the cache, then expand the
  filled prefix once and run SDPA, which beats scoring every query against the latent at long context.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, CausalVariant, causal_lower_right
from torchtune.modules.attention_utils import _MaskType

from mla_components._validation import check_positive_ints, check_rope_dim
from mla_components.modules.backend import resolve_backend, validate_kernel_backend
from mla_components.modules.kv_cache import MLAKVCache, causal_cache_mask, validate_kv_cache_dtype
from mla_kernels.fp8 import dequantize_latent_fp8

try:  # flex attention handles packed-sequence BlockMasks (optional, as in Torchtune)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch without flex attention
    BlockMask, flex_attention = None, None


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[0]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[1]


@functools.cache
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # PyTorch's flash kernel: sm80 and newer


def flash_value_padding(q: torch.Tensor, kv_len: int, v_dim: int, mask: object, dropout_p: float) -> int:
    """Columns to widen the value by so SDPA can run its flash kernel; 0 = run as given. ``q [b, n_h, s_x, d_qk]``
    attends to ``kv_len`` keys with values ``v_dim`` wide.

    MLA's value is narrower than its query/key (``d_v < d_n + d_r``) and SDPA's flash kernel needs one head width,
    so an unpadded call falls to the memory-efficient kernel. The widened value costs ``d_qk - d_v`` wasted output
    columns, but flash is the faster kernel (1.9x per prefill chunk on an H200, ``benchmarks/benchmark_prefill.py
    chunk``). Only where flash takes the call: CUDA inference on sm80+, half precision, flash enabled, a
    ``CausalBias`` or no mask (then square: flash refuses a non-square ``is_causal``). Elsewhere the padding would buy
    nothing, and under autograd it would keep the wider value for the backward pass.
    """
    qk_dim = q.shape[-1]
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and v_dim < qk_dim <= 256 and qk_dim % 8 == 0):
        return 0
    if torch.is_grad_enabled() or dropout_p > 0 or not torch.backends.cuda.flash_sdp_enabled():
        return 0
    if not (isinstance(mask, CausalBias) or (mask is None and q.shape[-2] == kv_len)):
        return 0
    return qk_dim - v_dim if _flash_capable(q.device.index or 0) else 0


# Cached steps with at most this many new tokens per sequence are decode steps: the absorbed path over the latent
# cache (the Triton kernel with that backend; each query row streams the cache once). Longer chunks are prefill:
# they expand the cached prefix once and run SDPA.
TRITON_DECODE_MAX_QUERIES = 4


def absorbed_attention_torch(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    c_kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent attention in PyTorch: ``q_latent [b, s, H, d_c]``, ``q_pe [b, s, H, d_r]``, ``c_kv [b, t, d_c]``,
    ``k_pe [b, t, d_r]``, ``mask [b, s, t]`` (True = attend; None = all keys) -> ``[b, s, H, d_c]``.

    Products in the queries' dtype, softmax in fp32 (the ``torch`` decode backend; also the
    "absorbed PyTorch" row of benchmarks/benchmark_mla.py). An fp8 cache passes the e4m3
    ``c_kv`` with its ``c_kv_scale [b, t, d_c / FP8_GROUP_SIZE]``; it is dequantised to the queries' dtype here."""
    if c_kv_scale is not None:
        c_kv = dequantize_latent_fp8(c_kv, c_kv_scale, q_latent.dtype)
    k_pe = k_pe.to(q_latent.dtype)  # the fp8 cache keeps the rope key in bf16 whatever the model's dtype
    scores = torch.einsum("bshc,btc->bsht", q_latent, c_kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    scores = scores.float() * softmax_scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(c_kv.dtype)
    return torch.einsum("bsht,btc->bshc", probs, c_kv)


class MultiHeadLatentAttention(nn.Module):
    """MLA with decoupled RoPE and a latent KV cache; a drop-in ``attn`` for ``TransformerSelfAttentionLayer``.

    Args:
        embed_dim (int): model dim ``d``.
        num_heads (int): ``n_h``.
        qk_nope_head_dim (int): ``d_n``, per-head key/query dims without position information.
        qk_rope_head_dim (int): ``d_r``, per-head query dims (and the shared key dims) that get RoPE.
        v_head_dim (int): ``d_v``.
        kv_lora_rank (int): ``d_c``, the width of the cached latent.
        kv_a_proj (nn.Module): ``d -> d_c + d_r`` (HF ``kv_a_proj_with_mqa``).
        kv_a_norm (nn.Module): RMSNorm over ``d_c`` (HF ``kv_a_layernorm``).
        kv_b_proj (nn.Module): ``d_c -> n_h * (d_n + d_v)``; rows per head are ``[W_UK; W_UV]``.
        output_proj (nn.Module): ``n_h * d_v -> d`` (HF ``o_proj``).
        pos_embeddings (nn.Module): rotary embedding over ``d_r`` with Torchtune's forward signature.
        softmax_scale (float): ``(d_n + d_r)**-0.5``, times YaRN's ``mscale**2`` when configured.
        q_proj (Optional[nn.Module]): ``d -> n_h * (d_n + d_r)``, when the query is not low-rank.
        q_a_proj, q_a_norm, q_b_proj (Optional[nn.Module]): low-rank query ``d -> q_lora_rank`` (HF
            ``q_a_proj``), RMSNorm (``q_a_layernorm``), ``q_lora_rank -> n_h * (d_n + d_r)`` (``q_b_proj``).
        max_seq_len (int): maximum sequence length (for Torchtune's bookkeeping).
        is_causal (bool): causal masking when no mask is given.
        attn_dropout (float): attention dropout in training.
        kernel_backend (str): ``"torch"``, ``"triton"`` or ``"auto"`` for the cached decode step, resolved once per
            :meth:`setup_cache` (:mod:`mla_components.modules.backend`; the builder picks RMSNorm/RoPE).
        kv_cache_dtype (str): ``"bf16"`` (the latent cache in the model's dtype) or ``"fp8_e4m3"`` (e4m3 latent with
            per-128-value fp32 scales, rope key in bf16; dequantised in the decode kernel's loads or, in PyTorch,
            before the absorbed product); see :class:`MLAKVCache`.

    Raises:
        ValueError: at construction, naming the field, if a dimension is not positive, the rope dim is odd, the
            query is configured both ways (or neither), or a projection's shape does not match the head dims.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        kv_a_proj: nn.Module,
        kv_a_norm: nn.Module,
        kv_b_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module,
        softmax_scale: float,
        q_proj: nn.Module | None = None,
        q_a_proj: nn.Module | None = None,
        q_a_norm: nn.Module | None = None,
        q_b_proj: nn.Module | None = None,
        max_seq_len: int = 4096,
        is_causal: bool = True,
        attn_dropout: float = 0.0,
        kernel_backend: str = "auto",
        kv_cache_dtype: str = "bf16",
    ) -> None:
        super().__init__()
        check_positive_ints(
            embed_dim=embed_dim,
            num_heads=num_heads,
            qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim,
            v_head_dim=v_head_dim,
            kv_lora_rank=kv_lora_rank,
            max_seq_len=max_seq_len,
        )
        check_rope_dim(qk_rope_head_dim)
        if not 0.0 <= attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1], got {attn_dropout}")
        validate_kv_cache_dtype(kv_cache_dtype, kv_lora_rank)
        validate_kernel_backend(kernel_backend)
        low_rank = (q_a_proj, q_a_norm, q_b_proj)
        if (q_proj is None) == all(m is None for m in low_rank) or (
            q_proj is None and any(m is None for m in low_rank)
        ):
            raise ValueError(
                "query projection: pass either q_proj (q_lora_rank=None) or all of q_a_proj, q_a_norm and "
                "q_b_proj (integer q_lora_rank)"
            )

        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        expected = {
            "q_proj.out_features": (q_proj, _out_features, num_heads * qk_head_dim),
            "q_b_proj.out_features": (q_b_proj, _out_features, num_heads * qk_head_dim),
            "q_b_proj.in_features": (
                q_b_proj,
                _in_features,
                None if q_a_proj is None else _out_features(q_a_proj),
            ),
            "kv_a_proj.out_features": (kv_a_proj, _out_features, kv_lora_rank + qk_rope_head_dim),
            "kv_b_proj.in_features": (kv_b_proj, _in_features, kv_lora_rank),
            "kv_b_proj.out_features": (kv_b_proj, _out_features, num_heads * (qk_nope_head_dim + v_head_dim)),
            "output_proj.in_features": (output_proj, _in_features, num_heads * v_head_dim),
        }
        for field, (module, get, want) in expected.items():
            if module is not None and hasattr(module, "weight") and get(module) != want:
                raise ValueError(
                    f"{field} is {get(module)} but num_heads ({num_heads}) and the head dims require {want}"
                )

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.softmax_scale = softmax_scale
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        self.attn_dropout = attn_dropout
        self.kernel_backend = kernel_backend
        self.decode_backend: str | None = None  # "torch" | "triton", resolved once by setup_cache
        self.kv_cache_dtype = kv_cache_dtype

        self.q_proj = q_proj
        self.q_a_proj = q_a_proj
        self.q_a_norm = q_a_norm
        self.q_b_proj = q_b_proj
        self.kv_a_proj = kv_a_proj
        self.kv_a_norm = kv_a_norm
        self.kv_b_proj = kv_b_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings

        # Torchtune's cache protocol (see torchtune.modules.MultiHeadAttention)
        self.kv_cache: MLAKVCache | None = None
        self.cache_enabled = False

    # ----------------------------------------------------------------- cache protocol
    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Allocate the latent cache (``[batch_size, max_seq_len, d_c + d_r]`` in ``dtype``, or the fp8 rows of
        :class:`MLAKVCache` with ``kv_cache_dtype="fp8_e4m3"``) and enable it; resolve ``kernel_backend`` for the
        cached decode against the weights' device (once, not per step; see :mod:`mla_components.modules.backend`)."""
        if self.kv_cache is not None:
            return  # like Torchtune: a second call keeps the existing cache
        device = self.kv_b_proj.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        self.decode_backend = resolve_backend(self.kernel_backend, device)
        with device:
            self.kv_cache = MLAKVCache(
                batch_size, max_seq_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype, self.kv_cache_dtype
            )
        self.cache_enabled = True

    def reset_cache(self) -> None:
        if self.kv_cache is None:
            raise RuntimeError("Key value caches are not setup. Call ``setup_caches()`` first.")
        self.kv_cache.reset()

    # ----------------------------------------------------------------- forward
    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, d] -> [b, s, n_h, d_n + d_r]``."""
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.num_heads, self.qk_head_dim)

    def _latent(self, y: torch.Tensor, input_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, s, d] ->`` normalised latent ``c_kv [b, s, d_c]`` and rotated shared key ``k_pe [b, s, d_r]``."""
        c_kv, k_pe = self.kv_a_proj(y).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = self.pos_embeddings(k_pe.unsqueeze(2), input_pos=input_pos).squeeze(2)
        return self.kv_a_norm(c_kv), k_pe

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: _MaskType | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): queries' input ``[b, s_x, d]``.
            y (Optional[torch.Tensor]): keys'/values' input ``[b, s_y, d]`` (``x`` for self-attention); None only
                with the cache enabled, to attend to what is cached.
            mask (Optional[_MaskType]): boolean ``[b, s_x, s_y]`` (True = attend; ``s_y`` = cache length when the
                cache is enabled) or a flex-attention ``BlockMask`` for packed sequences. None = causal. With the
                cache enabled, also SDPA's ``causal_lower_right(s_x, filled)`` (queries = the last ``s_x`` of the
                ``filled`` cached positions), which keeps prefill chunks on the fused SDPA kernels.
            input_pos (Optional[torch.Tensor]): position ids ``[b, s_x]`` (or broadcastable), None = 0..s_x-1.

        Returns:
            torch.Tensor: ``[b, s_x, d]``.
        """
        b, s_x, _ = x.shape
        q_nope, q_pe = self._query(x).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = self.pos_embeddings(q_pe, input_pos=input_pos)

        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            c_kv, k_pe = self.kv_cache.c_kv, self.kv_cache.k_pe
        else:
            c_kv, k_pe = self._latent(y, input_pos)
            if self.kv_cache is not None and self.cache_enabled:
                c_kv, k_pe = self.kv_cache.update(c_kv, k_pe)

        if self.kv_cache is not None and self.cache_enabled:
            # the fill level is a host sync: read it only where a mask is built or the prefix is sliced, so a decode
            # step given its boolean mask stays sync-free (CUDA-graph capturable)
            causal = mask is None or isinstance(mask, CausalBias)  # causal over what has been cached so far
            filled = self.kv_cache.size if causal or s_x > TRITON_DECODE_MAX_QUERIES else None
            if isinstance(mask, CausalBias) and (
                mask.variant != CausalVariant.LOWER_RIGHT or (mask.seq_len_q, mask.seq_len_kv) != (s_x, filled)
            ):
                raise ValueError(
                    f"a CausalBias mask must be causal_lower_right({s_x}, {filled}) (this chunk's queries are the "
                    f"last of the {filled} cached positions), got {mask.variant} ({mask.seq_len_q}, {mask.seq_len_kv})"
                )
            if s_x > TRITON_DECODE_MAX_QUERIES:
                # A prefill chunk: expanding the filled prefix once and running SDPA over it beats the absorbed
                # path, whose [s_x, n_h, max_seq_len] fp32 scores dominate long-context prefill. The causal case as
                # a lower-right CausalBias keeps SDPA on its flash / memory-efficient kernels; a boolean mask makes
                # it materialise a bias.
                c_kv, k_pe = self.kv_cache.dequantized(b, filled)
                chunk_mask = causal_lower_right(s_x, filled) if causal else mask[..., :filled]
                out = self._expanded_attention(q_nope, q_pe, c_kv, k_pe, chunk_mask)
            else:
                if causal:
                    mask = causal_cache_mask(filled - s_x, s_x, self.kv_cache.max_seq_len, x.device).expand(b, -1, -1)
                scale = self.kv_cache.c_kv_scale
                out = self._absorbed_attention(
                    q_nope, q_pe, c_kv[:b], k_pe[:b], mask, c_kv_scale=None if scale is None else scale[:b]
                )
        else:
            out = self._expanded_attention(q_nope, q_pe, c_kv, k_pe, mask)
        return self.output_proj(out.reshape(b, s_x, self.num_heads * self.v_head_dim))

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [n_h, d_n, d_c]`` and ``W_UV [n_h, d_v, d_c]`` as views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorbed_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: torch.Tensor,
        c_kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention against the latent cache; returns ``[b, s_x, n_h, d_v]``.

        ``q_nope [b, s, n_h, d_n]``, ``q_pe [b, s, n_h, d_r]``, ``c_kv [b, t, d_c]``, ``k_pe [b, t, d_r]``,
        ``mask [b, s, t]`` (True = attend); an fp8 cache passes its e4m3 ``c_kv``, bf16 ``k_pe`` and fp32
        ``c_kv_scale [b, t, d_c / 128]``.
        """
        w_uk, w_uv = self._kv_b_weights()
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)
        if q_latent.shape[1] <= TRITON_DECODE_MAX_QUERIES and self.decode_backend == "triton":
            out_latent = self._triton_latent_decode(q_latent, q_pe, c_kv, k_pe, mask, c_kv_scale)
        else:
            out_latent = absorbed_attention_torch(q_latent, q_pe, c_kv, k_pe, mask, self.softmax_scale, c_kv_scale)
        return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)

    def _triton_latent_decode(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: torch.Tensor,
        c_kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused flash-decode kernel over the cache: ``q_latent [b, s, n_h, d_c]`` -> ``[b, s, n_h, d_c]``.

        Keys past the cache's fill level are never read (lengths come from the cache position, a device tensor,
        so no host sync and CUDA-graph safe); ``mask [b, s, t]`` selects among the filled ones.
        """
        from mla_kernels.mla_decode import mla_decode  # imports Triton only when this backend runs

        b, s, n_h, d_c = q_latent.shape
        filled = self.kv_cache.cache_pos[:1].to(torch.int32)
        seq_lens = filled.expand(b * s).contiguous()
        out, _ = mla_decode(
            q_latent.reshape(b * s, n_h, d_c),
            q_pe.reshape(b * s, n_h, -1).to(q_latent.dtype),
            c_kv,
            k_pe,
            seq_lens,
            self.softmax_scale,
            c_kv_scale=c_kv_scale,
            key_mask=mask,
        )
        return out.view(b, s, n_h, d_c)

    def _expanded_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[b, n_h, s_y, d_n + d_r]`` and values ``[b, n_h, s_y, d_v]`` from the latent
        ``c_kv [b, s_y, d_c]`` and the shared rope key ``k_pe [b, s_y, d_r]``."""
        b, s_y, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s_y, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _widened_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_expanded_kv`, the values zero-padded to the keys' width ``d_n + d_r`` (for SDPA's flash kernel).

        Each comes from its own projection, with ``W_UK`` / ``W_UV`` padded by zero rows, and the rope key is written
        into the keys in place: no ``[k_nope | v]`` expansion or unpadded value is held beside them (at 1M tokens,
        mla_1b's keys and padded values are 6.4 GB each, and the expansion would add 8.6 GB).
        """
        b, s_y, _ = c_kv.shape
        width, (w_uk, w_uv) = self.qk_nope_head_dim + self.qk_rope_head_dim, self._kv_b_weights()
        k = F.linear(c_kv, F.pad(w_uk, (0, 0, 0, self.qk_rope_head_dim)).flatten(0, 1))
        k = k.view(b, s_y, self.num_heads, width)
        k[..., self.qk_nope_head_dim :] = k_pe.unsqueeze(2)
        v = F.linear(c_kv, F.pad(w_uv, (0, 0, 0, width - self.v_head_dim)).flatten(0, 1))
        return k.transpose(1, 2), v.view(b, s_y, self.num_heads, width).transpose(1, 2)

    def _expanded_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: _MaskType | None,
    ) -> torch.Tensor:
        """Decompress the latent to per-head K/V and run SDPA; returns ``[b, s_x, n_h, d_v]``."""
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [b, n_h, s_x, d_n + d_r]
        dropout_p = self.attn_dropout if self.training else 0.0
        if BlockMask is not None and isinstance(mask, BlockMask):
            k, v = self._expanded_kv(c_kv, k_pe)
            return flex_attention(q, k, v, block_mask=mask, scale=self.softmax_scale).transpose(1, 2)
        if flash_value_padding(q, c_kv.shape[1], self.v_head_dim, mask, dropout_p):
            k, v = self._widened_kv(c_kv, k_pe)
        else:
            k, v = self._expanded_kv(c_kv, k_pe)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask if mask is None or isinstance(mask, CausalBias) else mask[:, None],
            dropout_p=dropout_p,
            is_causal=mask is None and self.is_causal,
            scale=self.softmax_scale,
        )
        return out[..., : self.v_head_dim].transpose(1, 2)
