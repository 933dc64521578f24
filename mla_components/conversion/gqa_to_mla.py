"""GQA/MHA (Llama family) -> DeepSeek-V3 MLA, following TransMLA's three steps on calibration statistics.

Notation: d model dim, n_q query heads, n_kv KV heads (group of query head j: ``g(j) = j // (n_q // n_kv)``),
h head dim, d_r = ``qk_rope_head_dim``, d_c = ``kv_lora_rank``; the origin's keys of all KV heads stacked are
``K = W_K x`` ``[n_kv * h]``, values ``V = W_V x`` ``[n_kv * h]``, with ``x`` the attention input (after the
layer's input RMSNorm) and a second moment ``S = E[x x^T]`` ``[d, d]`` from calibration text.

1. **GQA as MLA, RoRoPE.** RoPE turns each frequency pair of every key head by the same angle, so any orthogonal
   mix *across KV heads*, applied alike to both members of a pair, commutes with it. Per kept frequency, the
   top principal direction of the heads' keys (a ``n_kv x n_kv`` PCA of ``E[k_h . k_h']``) becomes the one shared
   rotary key ``k_pe``; every other direction, and every frequency the MLA rope does not keep, loses its rotation
   and joins the position-free keys. The query gets the transposed mix, so the logits are unchanged up to the
   rotation dropped from what is not in ``k_pe``. DeepSeek's rope frequencies are ``theta^(-2a/d_r)``: with the
   origin's theta, frequency ``a`` equals the origin's ``a * h / d_r`` exactly when ``d_r`` divides ``h``
   (otherwise the nearest origin frequency is kept, an approximation the report states).
2. **Joint low-rank K/V.** The position-free keys ``z_k`` (``n_kv * h - d_r``) and the values ``z_v``
   (``n_kv * h``) are one linear image of ``x``; with ``d_c >= n_kv * h * 2 - d_r`` the latent is exactly that
   image (zero-padded); with less, a PCA weighted by what consumes each part (query second moments for keys, the
   output projection for values, balanced so each part carries the same weighted energy — TransMLA's balanced KV)
   keeps the ``d_c`` directions that matter most for the attention output.
3. **The latent RMSNorm.** DeepSeek-V3 normalises the latent before ``kv_b_proj``; a linear conversion has no such
   step, and dividing each token's keys and values by its own latent RMS is the largest training-free error (on
   SmolLM2-135M it raises held-out perplexity ~2.7x). Latent dimensions not needed for content (the zero padding
   of a wide latent, or a few taken from a narrow one) become *norm stabilisers*: linear features of ``x``, fitted
   on the calibration tokens, that ``kv_b_proj`` ignores and that make ``||c||`` nearly the same for every token,
   so the norm divides by a near-constant. The norm's weight is then the least-squares scale that maps
   ``c / rms(c)`` back to ``c`` on the calibration tokens. Optionally the content is (partially) whitened first.

Queries are scaled by ``sqrt((h + d_r) / h)`` because MLA's softmax scale is ``(d_n + d_r)^-0.5`` with
``d_n = h``. Everything is computed in float64 and returned as float32 HF DeepseekV3 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mla_components._validation import check_positive_int, check_rope_dim
from mla_components.models import MLAConfig
from mla_components.modules.rope import identity_yarn


@dataclass
class LayerCalibration:
    """Statistics of one layer's attention input ``x`` (after the input RMSNorm) on calibration text.

    Attributes:
        second_moment (Tensor): ``E[x x^T]`` ``[d, d]``, float64.
        samples (Tensor): a subsample of the inputs ``[n, d]``, float32 (for the latent norm's weight).
    """

    second_moment: torch.Tensor
    samples: torch.Tensor


@dataclass
class LayerReport:
    """What the conversion of one layer kept (fractions of calibration energy) and how steady the latent's RMS is."""

    rope_key_energy: float  # share of the key energy at the kept frequencies that the shared k_pe carries
    latent_energy: float  # share of the weighted [z_k; z_v] energy the latent keeps (1.0 when exact)
    latent_rms_cv: float  # coefficient of variation of rms(latent) over calibration tokens (0 = norm is exact)


@dataclass
class ConversionResult:
    config: MLAConfig
    hf_state_dict: dict[str, torch.Tensor]
    layers: list[LayerReport] = field(default_factory=list)
    exact_rope_frequencies: bool = True

    def summary(self) -> dict[str, Any]:
        def mean(name: str) -> float:
            return sum(getattr(r, name) for r in self.layers) / len(self.layers)

        return {
            "kv_lora_rank": self.config.kv_lora_rank,
            "qk_rope_head_dim": self.config.qk_rope_head_dim,
            "cache_values_per_token_and_layer": self.config.kv_cache_width,
            "exact_rope_frequencies": self.exact_rope_frequencies,
            "mean_rope_key_energy": round(mean("rope_key_energy"), 4),
            "mean_latent_energy": round(mean("latent_energy"), 4),
            "mean_latent_rms_cv": round(mean("latent_rms_cv"), 4),
        }


@dataclass(frozen=True)
class OriginShape:
    """The attention sizes of a Llama-family ``config.json``."""

    hidden: int
    n_q: int
    n_kv: int
    head_dim: int
    rope_theta: float

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> OriginShape:
        n_q = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            n_q=n_q,
            n_kv=config.get("num_key_value_heads") or n_q,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_q,
            rope_theta=float(config.get("rope_theta", 10_000.0)),
        )

    @property
    def max_latent_rank(self) -> int:
        """Width of the position-free keys plus values: the largest latent with content (TransMLA's bound)."""
        return 2 * self.n_kv * self.head_dim


def check_conversion_args(shape: OriginShape, kv_lora_rank: int, qk_rope_head_dim: int) -> None:
    """Refuse, naming the field, ranks the method cannot produce from this origin (before any compute)."""
    check_positive_int("kv_lora_rank", kv_lora_rank)
    check_rope_dim(qk_rope_head_dim)
    if qk_rope_head_dim > shape.head_dim:
        raise ValueError(
            f"qk_rope_head_dim={qk_rope_head_dim} exceeds the origin's head dim ({shape.head_dim}): the shared "
            f"rotary key can hold at most one head's {shape.head_dim // 2} frequencies; choose <= {shape.head_dim}"
        )
    if shape.n_q % shape.n_kv:
        raise ValueError(f"num_attention_heads ({shape.n_q}) must be a multiple of num_key_value_heads ({shape.n_kv})")
    # The latent must hold something of both keys and values; more than all of them is zero padding.
    if kv_lora_rank < 2:
        raise ValueError(f"kv_lora_rank={kv_lora_rank} is too small to carry both keys and values; use >= 2")


def rope_frequency_map(head_dim: int, rope_dim: int) -> tuple[list[int], bool]:
    """Origin frequency index for each of the MLA rope's ``rope_dim // 2`` frequencies (same theta), and whether
    every one matches exactly (``theta^(-2a/d_r) = theta^(-2i/h)`` iff ``i = a * h / d_r``)."""
    ratio = head_dim / rope_dim
    picked = [min(round(a * ratio), head_dim // 2 - 1) for a in range(rope_dim // 2)]
    return picked, all(float(a * ratio).is_integer() for a in range(rope_dim // 2))


def _canonical_signs(vectors: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Eigen/singular vectors (along ``dim``: columns for ``dim=0``) with each one's largest entry positive.

    LAPACK builds may return any vector negated; fixing the sign lets a conversion rerun on another machine give
    the same weights up to rounding (a compact delta checks its base against them, within a tolerance), and the
    negation is function-preserving. It cannot pin a basis inside a (near-)degenerate eigenspace; the delta's
    base fingerprint refuses such a rebuild by name.
    """
    index = vectors.abs().argmax(dim, keepdim=True)
    signs = torch.gather(vectors, dim, index).sign()
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def _sym_power(matrix: torch.Tensor, power: float, floor: float) -> torch.Tensor:
    """``matrix^power`` for a symmetric PSD matrix, eigenvalues clamped below at ``floor * max eigenvalue``."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(floor * values.max().clamp_min(1e-30))
    return (vectors * values.pow(power)) @ vectors.T


def _key_mix(w_k: torch.Tensor, s: torch.Tensor, shape: OriginShape, rope_dim: int) -> tuple[torch.Tensor, float]:
    """RoRoPE's orthogonal mix of the stacked keys: ``T [n_kv*h, n_kv*h]`` whose first ``rope_dim`` rows give
    ``k_pe`` in DeepSeek's interleaved pair layout and whose other rows give the position-free keys ``z_k``.

    The origin stores each head's pairs HF-style: frequency ``i`` is dims ``(i, i + h/2)``.
    """
    h, n_kv = shape.head_dim, shape.n_kv
    half = h // 2
    cov = w_k @ s @ w_k.T  # E[K K^T]
    picked, _ = rope_frequency_map(h, rope_dim)
    rows_pe, rows_rest = [], []
    kept_energy = total_energy = 0.0
    for i in range(half):
        # index of (head, member) in the stacked K: member 0 = dim i, member 1 = dim i + h/2
        idx = [[hd * h + i, hd * h + i + half] for hd in range(n_kv)]
        members = torch.tensor(idx, dtype=torch.long)  # [n_kv, 2]
        head_cov = sum(cov[members[:, m]][:, members[:, m]] for m in range(2))  # [n_kv, n_kv]
        values, vectors = torch.linalg.eigh(head_cov)
        vectors = _canonical_signs(vectors)
        order = torch.argsort(values, descending=True)
        vectors = vectors[:, order]  # columns: principal directions across heads
        directions = range(n_kv)
        if i in picked:
            kept_energy += float(values[order[0]])
            total_energy += float(values.sum())
            for m in range(2):
                row = torch.zeros(n_kv * h, dtype=cov.dtype)
                row[members[:, m]] = vectors[:, 0]
                rows_pe.append((picked.index(i), m, row))
            directions = range(1, n_kv)
        for u in directions:
            for m in range(2):
                row = torch.zeros(n_kv * h, dtype=cov.dtype)
                row[members[:, m]] = vectors[:, u]
                rows_rest.append(row)
    rows_pe.sort(key=lambda item: (item[0], item[1]))  # interleaved: (a, real), (a, imag), (a + 1, real), ...
    mix = torch.stack([row for _, _, row in rows_pe] + rows_rest)
    return mix, kept_energy / max(total_energy, 1e-30)


def norm_stabilizer(content: torch.Tensor, inputs: torch.Tensor, dims: int, steps: int = 400) -> torch.Tensor:
    """Rows ``B [dims, d]`` for extra latent dimensions ``B x`` that make ``||c||^2 + ||B x||^2`` as constant as
    possible over the calibration tokens (``content`` = ``c [n, r]``, ``inputs`` = ``x [n, d]``), so that the
    latent RMSNorm divides every token by nearly the same number. ``kv_b_proj`` ignores these dimensions.

    The rows live in the span of the inputs' top ``n // 8`` principal directions, so that few calibration tokens
    cannot be fitted by rows that do nothing useful on other text.
    """
    x = inputs.to(torch.float64)
    energy = content.to(torch.float64).pow(2).sum(-1)
    _, _, directions = torch.linalg.svd(x, full_matrices=False)
    directions = _canonical_signs(directions, dim=1)
    basis = directions[: max(1, min(x.shape[1], x.shape[0] // 8))]  # [k, d]
    x = x @ basis.T
    scale = energy.mean().sqrt() / x.pow(2).sum(-1).mean().sqrt()
    generator = torch.Generator().manual_seed(0)
    rows = (0.1 * scale * torch.randn(dims, x.shape[1], generator=generator, dtype=torch.float64)).requires_grad_()
    optimizer = torch.optim.Adam([rows], lr=float(0.02 * scale))
    for _ in range(steps):
        # rows @ x.T, not x @ rows.T: the same products, but CPU BLAS runs this float64 shape 2-3x faster
        total = energy + (rows @ x.T).pow(2).sum(0)
        loss = total.var() / total.mean().pow(2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return rows.detach() @ basis


def convert_layer(
    weights: dict[str, torch.Tensor],
    calibration: LayerCalibration,
    shape: OriginShape,
    kv_lora_rank: int,
    rope_dim: int,
    *,
    whitening: float = 0.0,
    stabilizer_dims: int = 0,
    eps: float = 1e-5,
) -> tuple[dict[str, torch.Tensor], LayerReport]:
    """Convert one layer's ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (HF Llama names, ``weights`` keyed by
    ``q``, ``k``, ``v``, ``o``) into DeepSeek-V3's ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
    ``kv_b_proj`` and ``o_proj`` (HF names without the layer prefix).

    Args:
        whitening: exponent ``alpha`` of the latent's whitening ``Sigma_c^(-alpha/2)`` (0 = none, 1 = full).
        stabilizer_dims: latent dimensions used as norm stabilisers (:func:`norm_stabilizer`): taken from the
            zero padding when ``kv_lora_rank`` exceeds the content width, from the content otherwise.
        eps: the model's RMSNorm epsilon (the latent norm uses it).
    """
    f64 = torch.float64
    h, n_q, n_kv = shape.head_dim, shape.n_q, shape.n_kv
    group = n_q // n_kv
    w_q, w_k, w_v, w_o = (weights[k].to(f64) for k in ("q", "k", "v", "o"))
    s = calibration.second_moment.to(f64)

    mix, rope_energy = _key_mix(w_k, s, shape, rope_dim)
    mix_pe, mix_rest = mix[:rope_dim], mix[rope_dim:]  # [d_r, n_kv*h], [n_kv*h - d_r, n_kv*h]
    w_pe = mix_pe @ w_k  # k_pe rows of kv_a_proj_with_mqa
    w_z = torch.cat([mix_rest @ w_k, w_v])  # [z_k; z_v] = w_z x, [2*n_kv*h - d_r, d]
    n_zk = mix_rest.shape[0]

    # What consumes each part of z: per-head nope keys q_j . (A_g z_k), values through o_proj.
    m_k = torch.zeros(n_zk, n_zk, dtype=f64)
    m_v = torch.zeros(n_kv * h, n_kv * h, dtype=f64)
    for j in range(n_q):
        g = j // group
        a_g = mix_rest[:, g * h : (g + 1) * h].T  # [h, n_zk]: z_k -> head g's position-free key
        w_qj = w_q[j * h : (j + 1) * h]
        m_k += a_g.T @ (w_qj @ s @ w_qj.T) @ a_g
        w_oj = w_o[:, j * h : (j + 1) * h]
        m_v[g * h : (g + 1) * h, g * h : (g + 1) * h] += w_oj.T @ w_oj
    cov_z = w_z @ s @ w_z.T
    energy_k = torch.trace(m_k @ cov_z[:n_zk, :n_zk])
    energy_v = torch.trace(m_v @ cov_z[n_zk:, n_zk:])
    weight = torch.block_diag(m_k / energy_k.clamp_min(1e-30), m_v / energy_v.clamp_min(1e-30))

    width = w_z.shape[0]
    content_rank = kv_lora_rank - stabilizer_dims
    if content_rank >= width:  # exact: the latent is z itself (then zero-padded)
        encode, decode, latent_energy = torch.eye(width, dtype=f64), torch.eye(width, dtype=f64), 1.0
    else:
        root = _sym_power(weight, 0.5, 1e-8)
        root_inv = _sym_power(weight, -0.5, 1e-8)
        values, vectors = torch.linalg.eigh(root @ cov_z @ root)
        vectors = _canonical_signs(vectors)
        order = torch.argsort(values, descending=True)
        top = vectors[:, order[:content_rank]]
        encode, decode = top.T @ root, root_inv @ top  # c = encode z, z ~ decode c
        latent_energy = float(values[order[:content_rank]].sum() / values.clamp_min(0).sum())
    rank = encode.shape[0]
    cov_c = encode @ cov_z @ encode.T
    white = _sym_power(cov_c, -whitening / 2, 1e-6) if whitening else torch.eye(rank, dtype=f64)
    white_inv = torch.linalg.inv(white)
    w_latent = white @ encode @ w_z  # [rank, d]
    decode = decode @ white_inv  # [width, rank]: z ~ decode c
    free = kv_lora_rank - rank
    if free and stabilizer_dims:
        content = calibration.samples.to(f64) @ w_latent.T
        extra = norm_stabilizer(content, calibration.samples, min(free, stabilizer_dims))
        w_latent = torch.cat([w_latent, extra])
        decode = torch.cat([decode, torch.zeros(decode.shape[0], extra.shape[0], dtype=f64)], 1)
        rank = w_latent.shape[0]

    # Latent norm weight: least squares of norm_weight * c / rms(c) ~ c over calibration tokens (zero padding
    # counts in rms, as the model computes it).
    c = calibration.samples.to(f64) @ w_latent.T  # [n, rank]
    rms = (c.pow(2).sum(-1, keepdim=True) / kv_lora_rank + eps).sqrt()
    norm_weight = torch.ones(kv_lora_rank, dtype=f64)
    norm_weight[:rank] = (c.pow(2) / rms).sum(0) / (c.pow(2) / rms.pow(2)).sum(0).clamp_min(1e-30)
    rms_cv = float(rms.std() / rms.mean())

    kv_a = torch.zeros(kv_lora_rank + rope_dim, shape.hidden, dtype=f64)
    kv_a[:rank] = w_latent
    kv_a[kv_lora_rank:] = w_pe
    kv_b_rows, q_rows = [], []
    q_scale = math.sqrt((h + rope_dim) / h)
    for j in range(n_q):
        g = j // group
        a_g = mix_rest[:, g * h : (g + 1) * h].T  # [h, n_zk]
        k_nope = torch.zeros(h, kv_lora_rank, dtype=f64)
        k_nope[:, :rank] = a_g @ decode[:n_zk]
        value = torch.zeros(h, kv_lora_rank, dtype=f64)
        value[:, :rank] = decode[n_zk + g * h : n_zk + (g + 1) * h]
        kv_b_rows += [k_nope, value]
        w_qj = w_q[j * h : (j + 1) * h]
        q_rows += [w_qj * q_scale, mix_pe[:, g * h : (g + 1) * h] @ w_qj * q_scale]
    out = {
        "q_proj.weight": torch.cat(q_rows),
        "kv_a_proj_with_mqa.weight": kv_a,
        "kv_a_layernorm.weight": norm_weight,
        "kv_b_proj.weight": torch.cat(kv_b_rows),
        "o_proj.weight": w_o,
    }
    out = {k: v.to(torch.float32).contiguous() for k, v in out.items()}
    return out, LayerReport(rope_energy, latent_energy, rms_cv)


def mla_config_for(
    origin_config: dict[str, Any], kv_lora_rank: int, qk_rope_head_dim: int, max_seq_len: int | None = None
) -> MLAConfig:
    """The MLA model a conversion produces: the origin's sizes, full-rank query, ``d_n = d_v = h``."""
    shape = OriginShape.from_hf_config(origin_config)
    return MLAConfig(
        vocab_size=origin_config["vocab_size"],
        num_layers=origin_config["num_hidden_layers"],
        num_heads=shape.n_q,
        embed_dim=shape.hidden,
        intermediate_dim=origin_config["intermediate_size"],
        max_seq_len=max_seq_len or origin_config.get("max_position_embeddings", 8192),
        q_lora_rank=None,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=shape.head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=shape.head_dim,
        rope_base=shape.rope_theta,
        rope_scaling=identity_yarn(max_seq_len or origin_config.get("max_position_embeddings", 8192)),
        norm_eps=origin_config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(origin_config.get("tie_word_embeddings", False)),
    )


_CARRIED = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def convert_llama_to_mla(
    origin_config: dict[str, Any],
    origin_state: dict[str, torch.Tensor],
    calibration: list[LayerCalibration],
    *,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    whitening: float = 0.0,
    stabilizer_dims: int = 0,
    max_seq_len: int | None = None,
) -> ConversionResult:
    """Convert an HF Llama state dict (rotate-half Q/K layout, as ``LlamaForCausalLM`` holds it) into an HF
    DeepseekV3 state dict for :func:`mla_config_for`'s model. Embeddings, norms and MLPs carry over unchanged."""
    shape = OriginShape.from_hf_config(origin_config)
    check_conversion_args(shape, kv_lora_rank, qk_rope_head_dim)
    config = mla_config_for(origin_config, kv_lora_rank, qk_rope_head_dim, max_seq_len)
    if len(calibration) != config.num_layers:
        raise ValueError(f"calibration has {len(calibration)} layers, the origin {config.num_layers}")
    out = {"model.embed_tokens.weight": origin_state["model.embed_tokens.weight"], "model.norm.weight": None}
    out["model.norm.weight"] = origin_state["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = origin_state["lm_head.weight"]
    reports = []
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        attn = {p: origin_state[f"{prefix}self_attn.{p}_proj.weight"] for p in ("q", "k", "v", "o")}
        converted, report = convert_layer(
            attn,
            calibration[layer],
            shape,
            kv_lora_rank,
            qk_rope_head_dim,
            whitening=whitening,
            stabilizer_dims=stabilizer_dims,
            eps=config.norm_eps,
        )
        out.update({f"{prefix}self_attn.{k}": v for k, v in converted.items()})
        out.update({prefix + k: origin_state[prefix + k] for k in _CARRIED})
        reports.append(report)
    _, exact = rope_frequency_map(shape.head_dim, qk_rope_head_dim)
    return ConversionResult(config, out, reports, exact and not origin_config.get("rope_scaling"))
