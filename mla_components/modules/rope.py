"""Decoupled rotary embedding for MLA, with DeepSeek's YaRN scaling.

MLA rotates only a small slice of each query head (``q_pe``) and one key vector shared by all heads (``k_pe``).
The rotation uses adjacent pairs ``(x0, x1), (x2, x3), ...`` — the layout of DeepSeek's ``view_as_complex``,
HF ``rope_interleave=True``, vLLM ``is_neox_style=False`` and Torchtune's ``RotaryPositionalEmbeddings`` — so the
forward pass is Torchtune's; only the frequencies (YaRN) and the cos/sin magnitude (YaRN's attention factor) differ.
The formulas follow HF transformers' ``_compute_yarn_parameters`` and DeepSeek-V3's ``precompute_freqs_cis``.
"""

import math
from typing import Any

import torch
from torchtune.modules import RotaryPositionalEmbeddings

from mla_components._validation import check_rope_dim

# Keys accepted in ``rope_scaling`` (HF DeepseekV3 ``rope_scaling`` / ``rope_parameters`` names).
YARN_REQUIRED_KEYS = ("factor", "original_max_position_embeddings")
YARN_OPTIONAL_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1.0 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def validate_rope_scaling(rope_scaling: dict[str, Any] | None, field: str = "rope_scaling") -> None:
    """Raise ``ValueError`` naming the offending key if a YaRN ``rope_scaling`` dict is incomplete or wrong."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"{field} must be a dict of YaRN settings or None, got {type(rope_scaling).__name__}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"{field}.rope_type must be 'yarn' (the only scaling DeepSeek-V3 uses), got {kind!r}")
    unknown = set(rope_scaling) - set(YARN_REQUIRED_KEYS) - set(YARN_OPTIONAL_KEYS) - {"rope_type", "type"}
    if unknown:
        raise ValueError(
            f"{field} has unknown keys {sorted(unknown)}; allowed: {sorted(YARN_REQUIRED_KEYS + YARN_OPTIONAL_KEYS)}"
        )
    for key in YARN_REQUIRED_KEYS:
        if rope_scaling.get(key) is None:
            raise ValueError(f"{field}.{key} is required for YaRN scaling (incomplete YaRN settings)")
    if not rope_scaling["factor"] >= 1:
        raise ValueError(f"{field}.factor must be >= 1, got {rope_scaling['factor']}")
    if int(rope_scaling["original_max_position_embeddings"]) <= 0:
        raise ValueError(f"{field}.original_max_position_embeddings must be positive")
    fast, slow = rope_scaling.get("beta_fast") or 32, rope_scaling.get("beta_slow") or 1
    if not fast > slow > 0:
        raise ValueError(f"{field}.beta_fast ({fast}) must be greater than {field}.beta_slow ({slow}) > 0")


def identity_yarn(original_max_position_embeddings: int) -> dict[str, Any]:
    """YaRN with factor 1: exactly plain RoPE (same frequencies, attention factor and softmax scale 1). Converted
    models carry it instead of ``rope_scaling: null`` because vLLM's CPU MLA path computes plain RoPE wrongly (its
    greedy tokens diverge from transformers' and ours) while its YaRN path matches, and because a later context
    extension only has to raise ``factor``."""
    return {
        "factor": 1.0,
        "original_max_position_embeddings": int(original_max_position_embeddings),
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None = None) -> float:
    """Softmax scale of MLA: ``qk_head_dim**-0.5`` times ``mscale(factor, mscale_all_dim)**2`` under YaRN.

    ``qk_head_dim`` is the pre-absorption head dim (nope + rope), never the 576-wide latent. Like HF DeepseekV3
    and vLLM (unlike DeepSeek's reference, which applies it only past the original length), the factor applies
    whenever ``mscale_all_dim`` is set.
    """
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        mscale = yarn_get_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies ``[dim // 2]`` and the cos/sin attention factor."""
    factor = float(rope_scaling["factor"])
    original_max = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    # ramp 0 -> keep the original (high) frequency, ramp 1 -> interpolate by ``factor``
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    return inv_freq, float(attention_factor)


class DecoupledRotaryEmbedding(RotaryPositionalEmbeddings):
    """Interleaved RoPE over MLA's ``qk_rope_head_dim`` slice, optionally YaRN-scaled.

    Args:
        dim (int): rotary dim (``qk_rope_head_dim``), even.
        max_seq_len (int): positions cached up front.
        base (float): RoPE theta.
        rope_scaling (Optional[dict]): YaRN settings (``factor``, ``original_max_position_embeddings``,
            ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``), or None for plain RoPE.

    ``forward(x [b, s, n_h, dim], *, input_pos [b, s] | [s] | [b] | None) -> [b, s, n_h, dim]`` is Torchtune's.
    Recipes build models on the meta device and then call ``rope_init()``; everything derives from the
    constructor arguments, so a meta build + ``rope_init()`` equals an eager build.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        check_rope_dim(dim)
        validate_rope_scaling(rope_scaling)
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def rope_init(self) -> None:
        if self.rope_scaling is None:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
            self.attention_factor = 1.0
        else:
            inv_freq, self.attention_factor = yarn_inv_freq(self.dim, self.base, self.rope_scaling)
        # created on the current default device, as Torchtune's recipes expect (they call rope_init() under
        # ``with torch.device(...)`` after a meta-device build)
        self.register_buffer("theta", inv_freq, persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int = 4096) -> None:
        super().build_rope_cache(max_seq_len)
        if self.attention_factor != 1.0:
            # YaRN scales cos and sin, i.e. both q_pe and k_pe (HF applies it the same way).
            self.cache.mul_(self.attention_factor)
