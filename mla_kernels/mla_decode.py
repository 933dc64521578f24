"""Fused MLA flash-decode over the latent KV cache (Triton), split-KV with a second reduction pass.

Each query row attends, per head, to the cached latent rows ``[c_kv | k_pe]`` (``d_c + d_r`` values per token,
576 for DeepSeek-V3) with the *absorbed* query ``q_latent = q_nope @ W_UK`` (``[H, d_c]``) and the rotated
``q_pe`` (``[H, d_r]``)::

    score[h, t] = (q_latent[h] . c_kv[t] + q_pe[h] . k_pe[t]) * softmax_scale
    out[h]      = sum_t softmax(score[h])[t] * c_kv[t]          # latent space; W_UV is applied by the caller
    lse[h]      = log(sum_t exp(score[h, t]))                    # natural log

The latent row is read once per head block and serves as both key and value, so the kernel streams
``seq_len * (d_c + d_r) * itemsize`` bytes and never materialises per-head K/V.

Stage 1 (grid ``[head_blocks, splits, rows]``): every program takes one block of heads (padded to the MMA
minimum of 16 rows) and one contiguous slice of one sequence's tokens, runs an fp32 online softmax over tiles of
``BLOCK_N`` tokens, and writes a normalised partial output plus its log2-sum-exp. Stage 2 (grid
``[rows, heads, d_c chunks]``) merges the partials. With one split, stage 1 writes the final output directly.
The split count comes from the batch, the head blocks, the cache length and the SM count
(:func:`choose_num_splits`) so that a single long sequence still fills the GPU.

Caches: contiguous ``[B, T, d]`` (any strides with a unit last stride, e.g. views of ``MLAKVCache.cache``) or
paged ``[num_blocks, page_size, d]`` with an int32 ``block_table [B, max_blocks]``. Lengths are per query row;
an optional boolean ``key_mask`` additionally selects keys (Torchtune's generation masks, left padding).

FP8 cache (FlashMLA's 656-byte rows for 512 + 64): ``c_kv`` in float8_e4m3fn with ``c_kv_scale`` (fp32, one per
``FP8_GROUP_SIZE`` latent values of a token) and ``k_pe`` in bf16. Only the fp8 bytes cross the memory bus. Each
scale group (at most ``MAX_FP8_GROUPS``) is its own ``[BLOCK_N, FP8_GROUP_SIZE]`` tile with its own 2D dots and
output accumulator, widened to a 16-bit MMA dtype (exact: every e4m3 value is a 16-bit float); its scale is
applied once per (token, group) — to the group's partial score before the groups are summed, and to the
probabilities of the group's P·V product — never per value. ``DecodeConfig.fp8_mma`` picks the MMA dtype for
bf16 queries: ``bf16`` (the queries' own dtype) or ``fp16`` (e4m3 widens to fp16 in one instruction per pair;
the latent queries are scaled by a power of two into fp16's range, exactly, and the probabilities carry 3 more
bits than bf16's); fp16 queries always take the fp16 path, fp32 queries fp32 dots. ``DecodeConfig.fp8_reload``
loads each group tile once per product, which puts the fp8 tiles in the ``cp.async`` pipeline
(:func:`stage1_compile_report` shows what the compiler builds, without a GPU). The fp16 path holds
``p * scale * 512`` in fp16, so it needs every scale group's largest magnitude below 57,344 (scale < 128); the
RMS-normed latents of these models are O(1-10). Use ``fp8_mma="bf16"`` for latents beyond that.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_kernels.fp8 import FP8_GROUP_SIZE
from mla_kernels.triton_launch import CompiledLauncher

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MMA_MIN_ROWS = 16  # tl.dot needs M, N, K >= 16
MAX_FP8_GROUPS = 4  # FlashMLA's 512 latent values = 4 scale groups; one accumulator per group
MAX_SPLITS = 512


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the stage-1 kernel.

    Args:
        block_h: heads per program (>= 16; fewer real heads are masked).
        block_n: tokens per tile of the online softmax.
        num_warps, num_stages: Triton launch/pipelining parameters.
        ctas_per_sm: stage-1 programs aimed for per SM when choosing the split count.
        min_split_tokens: no split is shorter than this (per sequence), so short sequences use fewer splits.
        fp8_mma: MMA dtype over an fp8 cache with bf16 queries: ``"bf16"`` or ``"fp16"`` (see the module doc;
            fp16 took 12-16% less time on an H200, docs/results/kernels.md).
        fp8_reload: over an fp8 cache, load each group tile a second time (an L2 hit) for the P·V product, so that
            both loads go through the ``cp.async`` pipeline; with one load Triton 3.6 does not pipeline the fp8
            tiles at all (``_fp8_group_values``). Off until timed on a GPU.
    """

    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    ctas_per_sm: int = 2
    min_split_tokens: int = 256
    fp8_mma: str = "fp16"
    fp8_reload: bool = False

    def __post_init__(self) -> None:  # checked once when a config is made, not on every decode call
        if self.block_h < MMA_MIN_ROWS or self.block_n < MMA_MIN_ROWS:
            raise ValueError(f"config.block_h and config.block_n must be >= {MMA_MIN_ROWS} (tl.dot minimum)")
        if self.fp8_mma not in ("bf16", "fp16"):
            raise ValueError(f"config.fp8_mma must be 'bf16' or 'fp16', got {self.fp8_mma!r}")


def default_config(num_heads: int, rows: int, num_sms: int, max_len: int, fp8: bool = False) -> DecodeConfig:
    """Launch parameters from two H100 sweeps (``docs/results/kernels.md``).

    32-token tiles with three pipeline stages win or come within ~2% of the best almost everywhere with one head
    block (H <= 16); a few rows want two programs per SM, short caches want short splits (more programs).
    More heads: 16-head blocks over 64-token tiles once rows x head blocks fill the SMs, else 64-head blocks
    (each KV tile read once for 64 heads). Over an ``fp8`` cache fewer than 4 rows also get two programs per SM
    (H200 sweep at one row: 107 vs 161 µs at 128k): the fp8 kernel is latency-bound, not bandwidth-bound.
    """
    short = rows * max_len <= 16384
    if num_heads <= MMA_MIN_ROWS or short:
        if short:
            return DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=2, min_split_tokens=64)
        if 4 <= rows < 16 or (fp8 and rows < 16):
            return DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=2)
        return DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=1)
    if rows * triton.cdiv(num_heads, MMA_MIN_ROWS) >= num_sms:
        return DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2, ctas_per_sm=1)
    return DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, ctas_per_sm=1)


def choose_num_splits(
    rows: int, head_blocks: int, max_len: int, num_sms: int, config: DecodeConfig, max_splits: int = MAX_SPLITS
) -> int:
    """Splits per sequence so that ``rows * head_blocks * splits`` programs fill ``ctas_per_sm * num_sms`` slots.

    Never more splits than ``max_len / min_split_tokens`` (each split must amortise its partial-output write),
    never fewer than one.
    """
    programs = rows * head_blocks
    target = config.ctas_per_sm * num_sms
    if programs >= target:
        return 1
    wanted = triton.cdiv(target, programs)
    by_length = max(1, triton.cdiv(max_len, config.min_split_tokens))
    return max(1, min(wanted, by_length, max_splits))


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 8 for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: exact products (the interpreter tests compare against fp64); bf16/fp16 use the tensor cores
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _fp8_group_scores(
    kv_rows,
    sc_rows,
    tok_ok,
    q,
    g: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Scale group ``g`` of one tile: its e4m3 values widened to the query's MMA dtype ``[BLOCK_N, GROUP]``, its
    scales ``[BLOCK_N]`` and its scaled partial scores ``[BLOCK_H, BLOCK_N]``."""
    kv = tl.load(kv_rows + g * GROUP, mask=tok_ok[:, None], other=0.0).to(q.dtype)
    sc = tl.load(sc_rows + g, mask=tok_ok, other=0.0)
    part = _dot(q, tl.trans(kv), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), IEEE)
    return kv, sc, part * sc[None, :]


@triton.jit
def _fp8_group_values(kv_rows, tok_ok, kv, g: tl.constexpr, GROUP: tl.constexpr, RELOAD: tl.constexpr):
    """Scale group ``g``'s values for the P·V product: the tile the scores used, or with ``RELOAD`` the same bytes
    loaded again (an L2 hit) under another cache hint, so Triton does not merge the two loads. A load that feeds
    two converted dot operands is not pipelined by Triton 3.6 (a plain register load in the loop, its latency
    exposed); each of the two loads feeds one and goes through the ``cp.async`` shared-memory pipeline."""
    if RELOAD:
        kv = tl.load(kv_rows + g * GROUP, mask=tok_ok[:, None], other=0.0, cache_modifier=".cg").to(kv.dtype)
    return kv


@triton.jit
def _store_out(ptrs, out, mask, DIRECT: tl.constexpr):
    # one split writes the final output in its dtype; several write fp32 partials for stage 2
    if DIRECT:
        tl.store(ptrs, out.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, out, mask=mask)


@triton.jit
def _mla_decode_stage1(
    q_lat_ptr,
    q_pe_ptr,
    ckv_ptr,
    kpe_ptr,
    ckv_scale_ptr,  # fp32 [.., T, d_c / GROUP] with FP8, else unused
    seq_lens_ptr,
    block_table_ptr,
    key_mask_ptr,
    out_ptr,
    lse_ptr,
    qk_scale,  # softmax_scale * log2(e)
    num_heads,
    queries_per_seq,
    num_splits,
    stride_ql_r,
    stride_ql_h,
    stride_qp_r,
    stride_qp_h,
    stride_ckv_b,
    stride_ckv_t,
    stride_kpe_b,
    stride_kpe_t,
    stride_cs_b,
    stride_cs_t,
    stride_bt_b,
    stride_km_b,
    stride_km_s,
    stride_km_t,
    stride_o_r,
    stride_o_h,
    stride_o_s,
    stride_l_r,
    stride_l_h,
    D_C: tl.constexpr,
    D_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: write the normalised output in its dtype and the natural-log lse
    IEEE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FP8: tl.constexpr,  # c_kv is e4m3 with per-group scales, one tile, dot and accumulator per group
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,  # D_C // GROUP, at most MAX_FP8_GROUPS
    FP8_F16: tl.constexpr,  # 16-bit queries: fp8 MMAs in fp16 (latent queries scaled by a power of two)
    FP8_RELOAD: tl.constexpr,  # load each fp8 group tile again for the P·V product (see _fp8_group_values)
    KPE_STRIDE_UNIT: tl.constexpr,  # the unit of stride_kpe_*: a power of two of elements (<= 16 B) dividing both
):
    # torch.compile's Inductor passes Python floats as fp64; the softmax must stay in fp32 (the dots' accumulators)
    qk_scale = tl.cast(qk_scale, tl.float32)
    # the rope cache's strides come in units of KPE_STRIDE_UNIT elements: Triton specialises an integer only on
    # divisibility by 16, which the bf16 rope key of a 656-byte fp8 row (stride 328) lacks, and rows not known to be
    # 16-byte aligned are loaded without vectors and outside the cp.async pipeline (int64: a stride that fits int32
    # only once divided must not wrap when multiplied back)
    stride_kpe_b = tl.cast(stride_kpe_b, tl.int64) * KPE_STRIDE_UNIT  # tl.cast: a stride of 1 comes as a constexpr
    stride_kpe_t = tl.cast(stride_kpe_t, tl.int64) * KPE_STRIDE_UNIT
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2)
    seq = row // queries_per_seq

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    head_ok = offs_h < num_heads
    c_ok = offs_c < D_C
    r_ok = offs_r < D_R

    # This program's token slice: every split of a sequence gets an equal share (a multiple of BLOCK_N, at
    # least MIN_SPLIT tokens), so ragged batches stay balanced and short sequences leave late splits empty.
    seq_len = tl.load(seq_lens_ptr + row)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)

    q_pe = tl.load(
        q_pe_ptr + row * stride_qp_r + offs_h[:, None] * stride_qp_h + offs_r[None, :],
        mask=head_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles must not produce NaN
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    if FP8:
        # one [BLOCK_H, GROUP] query slice and accumulator per scale group: one scale per (token, group) multiplies
        # a whole group's dot product, so the e4m3 values enter the MMAs as they are and no tile is reshaped
        offs_k = tl.arange(0, GROUP)
        q_rows = q_lat_ptr + row * stride_ql_r + offs_h[:, None] * stride_ql_h + offs_k[None, :]
        q0 = tl.load(q_rows, mask=head_ok[:, None], other=0.0)
        q1 = q0
        q2 = q0
        q3 = q0
        if NUM_GROUPS > 1:
            q1 = tl.load(q_rows + GROUP, mask=head_ok[:, None], other=0.0)
        if NUM_GROUPS > 2:
            q2 = tl.load(q_rows + 2 * GROUP, mask=head_ok[:, None], other=0.0)
        if NUM_GROUPS > 3:
            q3 = tl.load(q_rows + 3 * GROUP, mask=head_ok[:, None], other=0.0)
        q_unit = 1.0  # scores are computed in units of q_unit
        pv_norm = 1.0
        if FP8_F16:
            # a power of two (from the exponent bits, so exactly one) that brings the largest query value into
            # [2^7, 2^8): the scaling is exact and far inside fp16's range
            q_max = tl.max(tl.max(tl.abs(q0.to(tl.float32)), axis=1), axis=0)
            if NUM_GROUPS > 1:
                q_max = tl.maximum(q_max, tl.max(tl.max(tl.abs(q1.to(tl.float32)), axis=1), axis=0))
            if NUM_GROUPS > 2:
                q_max = tl.maximum(q_max, tl.max(tl.max(tl.abs(q2.to(tl.float32)), axis=1), axis=0))
            if NUM_GROUPS > 3:
                q_max = tl.maximum(q_max, tl.max(tl.max(tl.abs(q3.to(tl.float32)), axis=1), axis=0))
            q_exp = tl.maximum(q_max, 1.0e-30).to(tl.int32, bitcast=True) & 0x7F800000
            q_unit = q_exp.to(tl.float32, bitcast=True) * 0.0078125  # 2^floor(log2 q_max) / 2^7
            q0 = (q0.to(tl.float32) / q_unit).to(tl.float16)
            q1 = (q1.to(tl.float32) / q_unit).to(tl.float16)
            q2 = (q2.to(tl.float32) / q_unit).to(tl.float16)
            q3 = (q3.to(tl.float32) / q_unit).to(tl.float16)
            pv_norm = 512.0  # p * scale * 512 = p * amax * 512 / 448: fp16's normal range for RMS-normed latents
        acc0 = tl.zeros([BLOCK_H, GROUP], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_H, GROUP], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_H, GROUP], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_H, GROUP], dtype=tl.float32)
    else:
        q_lat = tl.load(
            q_lat_ptr + row * stride_ql_r + offs_h[:, None] * stride_ql_h + offs_c[None, :],
            mask=head_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)

    for tile in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        tok = tile + offs_n
        tok_ok = tok < end
        if PAGED:
            page = tl.load(block_table_ptr + seq * stride_bt_b + tok // PAGE_SIZE, mask=tok_ok, other=0).to(tl.int64)
            # page and in-page offset scaled separately: Triton's divisibility analysis takes page * PAGE_SIZE +
            # tok % PAGE_SIZE for a multiple of PAGE_SIZE, so slot * stride would be assumed aligned (and the loads
            # vectorised) for rows whose byte stride is not a multiple of 16, such as the packed fp8 layout
            within = (tok % PAGE_SIZE).to(tl.int64)
            ckv_rows = page * (PAGE_SIZE * stride_ckv_t) + within * stride_ckv_t
            kpe_rows = page * (PAGE_SIZE * stride_kpe_t) + within * stride_kpe_t
            cs_rows = page * (PAGE_SIZE * stride_cs_t) + within * stride_cs_t
        else:
            ckv_rows = seq.to(tl.int64) * stride_ckv_b + tok.to(tl.int64) * stride_ckv_t
            kpe_rows = seq.to(tl.int64) * stride_kpe_b + tok.to(tl.int64) * stride_kpe_t
            cs_rows = seq.to(tl.int64) * stride_cs_b + tok.to(tl.int64) * stride_cs_t
        kr = tl.load(kpe_ptr + kpe_rows[:, None] + offs_r[None, :], mask=tok_ok[:, None] & r_ok[None, :], other=0.0)
        kr = kr.to(q_pe.dtype)  # the rope key stays 16-bit in the fp8 layout
        if FP8:
            kv_rows = ckv_ptr + ckv_rows[:, None] + offs_k[None, :]
            sc_rows = ckv_scale_ptr + cs_rows
            kv0, sc0, scores = _fp8_group_scores(kv_rows, sc_rows, tok_ok, q0, 0, GROUP, BLOCK_H, BLOCK_N, IEEE)
            kv1, sc1, kv2, sc2, kv3, sc3 = kv0, sc0, kv0, sc0, kv0, sc0
            if NUM_GROUPS > 1:
                kv1, sc1, part = _fp8_group_scores(kv_rows, sc_rows, tok_ok, q1, 1, GROUP, BLOCK_H, BLOCK_N, IEEE)
                scores += part
            if NUM_GROUPS > 2:
                kv2, sc2, part = _fp8_group_scores(kv_rows, sc_rows, tok_ok, q2, 2, GROUP, BLOCK_H, BLOCK_N, IEEE)
                scores += part
            if NUM_GROUPS > 3:
                kv3, sc3, part = _fp8_group_scores(kv_rows, sc_rows, tok_ok, q3, 3, GROUP, BLOCK_H, BLOCK_N, IEEE)
                scores += part
            scores = scores * q_unit
        else:
            kv = tl.load(ckv_ptr + ckv_rows[:, None] + offs_c[None, :], mask=tok_ok[:, None] & c_ok[None, :], other=0.0)
            scores = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
            scores = _dot(q_lat, tl.trans(kv), scores, IEEE)
        scores = _dot(q_pe, tl.trans(kr), scores, IEEE)
        scores = scores * qk_scale
        keep = tok_ok
        if HAS_MASK:
            km = tl.load(
                key_mask_ptr + seq * stride_km_b + (row % queries_per_seq) * stride_km_s + tok * stride_km_t,
                mask=tok_ok,
                other=0,
            )
            keep = keep & (km != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8:  # each group's values weighted by p times that group's scale
            kv0 = _fp8_group_values(kv_rows, tok_ok, kv0, 0, GROUP, FP8_RELOAD)
            acc0 = _dot((p * (sc0 * pv_norm)[None, :]).to(kv0.dtype), kv0, acc0 * alpha[:, None], IEEE)
            if NUM_GROUPS > 1:
                kv1 = _fp8_group_values(kv_rows, tok_ok, kv1, 1, GROUP, FP8_RELOAD)
                acc1 = _dot((p * (sc1 * pv_norm)[None, :]).to(kv1.dtype), kv1, acc1 * alpha[:, None], IEEE)
            if NUM_GROUPS > 2:
                kv2 = _fp8_group_values(kv_rows, tok_ok, kv2, 2, GROUP, FP8_RELOAD)
                acc2 = _dot((p * (sc2 * pv_norm)[None, :]).to(kv2.dtype), kv2, acc2 * alpha[:, None], IEEE)
            if NUM_GROUPS > 3:
                kv3 = _fp8_group_values(kv_rows, tok_ok, kv3, 3, GROUP, FP8_RELOAD)
                acc3 = _dot((p * (sc3 * pv_norm)[None, :]).to(kv3.dtype), kv3, acc3 * alpha[:, None], IEEE)
        else:
            acc = acc * alpha[:, None]
            acc = _dot(p.to(kv.dtype), kv, acc, IEEE)
        m_i = m_new

    nonempty = l_i > 0.0
    lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    o_base = out_ptr + row * stride_o_r + pid_s * stride_o_s
    norm = tl.where(nonempty, l_i, 1.0)
    if FP8:
        o_ptrs = o_base + offs_h[:, None] * stride_o_h + offs_k[None, :]
        norm = norm * pv_norm
        _store_out(o_ptrs, acc0 / norm[:, None], head_ok[:, None], DIRECT)
        if NUM_GROUPS > 1:
            _store_out(o_ptrs + GROUP, acc1 / norm[:, None], head_ok[:, None], DIRECT)
        if NUM_GROUPS > 2:
            _store_out(o_ptrs + 2 * GROUP, acc2 / norm[:, None], head_ok[:, None], DIRECT)
        if NUM_GROUPS > 3:
            _store_out(o_ptrs + 3 * GROUP, acc3 / norm[:, None], head_ok[:, None], DIRECT)
    else:
        o_ptrs = o_base + offs_h[:, None] * stride_o_h + offs_c[None, :]
        _store_out(o_ptrs, acc / norm[:, None], head_ok[:, None] & c_ok[None, :], DIRECT)
    if DIRECT:
        tl.store(lse_ptr + row * stride_l_r + offs_h * stride_l_h, lse2 * 0.6931471805599453, mask=head_ok)
    else:
        tl.store(lse_ptr + row * stride_l_r + offs_h * stride_l_h + pid_s, lse2, mask=head_ok)


@triton.jit
def _mla_decode_stage2(
    part_out_ptr,  # fp32 [R, H, S, d_c], each split normalised
    part_lse_ptr,  # fp32 [R, H, S], log2 domain
    out_ptr,  # [R, H, d_c]
    lse_ptr,  # fp32 [R, H], natural log
    num_splits,
    stride_po_r,
    stride_po_h,
    stride_po_s,
    stride_pl_r,
    stride_pl_h,
    stride_o_r,
    stride_o_h,
    stride_l_r,
    stride_l_h,
    D_C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_ALL_S: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < D_C

    lse_base = part_lse_ptr + row * stride_pl_r + head * stride_pl_h
    offs_all = tl.arange(0, BLOCK_ALL_S)
    all_lse = tl.load(lse_base + offs_all, mask=offs_all < num_splits, other=float("-inf"))
    top = tl.max(all_lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: weights 0, output 0, lse -inf
    denom = tl.sum(tl.exp2(all_lse - top), axis=0)

    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    out_base = part_out_ptr + row * stride_po_r + head * stride_po_h
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        weight = tl.exp2(tl.load(lse_base + offs_s, mask=s_ok, other=float("-inf")) - top)
        part = tl.load(
            out_base + offs_s[:, None] * stride_po_s + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0
        )
        acc += tl.sum(weight[:, None] * part, axis=0)

    safe = tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + row * stride_o_r + head * stride_o_h + offs_c, (acc / safe).to(out_ptr.dtype.element_ty), c_ok)
    if pid_c == 0:
        lse = tl.where(denom > 0.0, (top + tl.log2(safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + row * stride_l_r + head * stride_l_h, lse)


def _check_inputs(q_latent, q_pe, c_kv, k_pe, seq_lens, block_table, key_mask, c_kv_scale=None) -> None:
    """Shape/dtype/device checks that raise a ValueError naming the argument (no device syncs)."""
    if q_latent.ndim != 3 or q_pe.ndim != 3:
        raise ValueError(
            f"q_latent and q_pe must be [rows, heads, dim], got {tuple(q_latent.shape)} and {tuple(q_pe.shape)}"
        )
    if q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_latent {tuple(q_latent.shape)} and q_pe {tuple(q_pe.shape)} differ in rows/heads")
    if c_kv.ndim != 3 or k_pe.ndim != 3 or c_kv.shape[:2] != k_pe.shape[:2]:
        raise ValueError(
            f"c_kv and k_pe must be [batch, tokens, dim] (or [blocks, page, dim]) with equal leading dims, got "
            f"{tuple(c_kv.shape)} and {tuple(k_pe.shape)}"
        )
    if q_latent.shape[2] != c_kv.shape[2] or q_pe.shape[2] != k_pe.shape[2]:
        raise ValueError(
            f"latent/rope widths differ: q_latent {q_latent.shape[2]} vs c_kv {c_kv.shape[2]}, "
            f"q_pe {q_pe.shape[2]} vs k_pe {k_pe.shape[2]}"
        )
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if c_kv_scale is None:
        dtypes = {t.dtype for t in (q_latent, q_pe, c_kv, k_pe)}
        if len(dtypes) != 1 or q_latent.dtype not in floats:
            hint = " (an fp8 c_kv needs its c_kv_scale)" if c_kv.dtype == torch.float8_e4m3fn else ""
            raise ValueError(
                f"q_latent, q_pe, c_kv, k_pe must share one of fp16/bf16/fp32, got {sorted(map(str, dtypes))}{hint}"
            )
    else:
        if c_kv.dtype != torch.float8_e4m3fn or c_kv_scale.dtype != torch.float32:
            raise ValueError(
                f"with c_kv_scale, c_kv must be float8_e4m3fn and c_kv_scale float32, got {c_kv.dtype} and "
                f"{c_kv_scale.dtype}"
            )
        groups = c_kv.shape[2] // FP8_GROUP_SIZE
        if groups > MAX_FP8_GROUPS:
            raise ValueError(
                f"an fp8 c_kv holds at most {MAX_FP8_GROUPS * FP8_GROUP_SIZE} latent values ({MAX_FP8_GROUPS} scale "
                f"groups, FlashMLA's 512), got {c_kv.shape[2]}: use a bf16 cache for wider latents"
            )
        if c_kv.shape[2] % FP8_GROUP_SIZE or c_kv_scale.shape != (*c_kv.shape[:2], groups):
            raise ValueError(
                f"c_kv_scale must be [{c_kv.shape[0]}, {c_kv.shape[1]}, d_c / {FP8_GROUP_SIZE}] for c_kv "
                f"{tuple(c_kv.shape)} (d_c a multiple of {FP8_GROUP_SIZE}), got {tuple(c_kv_scale.shape)}"
            )
        if q_latent.dtype != q_pe.dtype or q_latent.dtype not in floats or k_pe.dtype not in floats:
            raise ValueError(
                f"q_latent and q_pe must share one of fp16/bf16/fp32 and k_pe be one of them, got {q_latent.dtype}, "
                f"{q_pe.dtype}, {k_pe.dtype}"
            )
    optional = [t for t in (block_table, key_mask, c_kv_scale) if t is not None]
    devices = {t.device for t in (q_latent, q_pe, c_kv, k_pe, seq_lens, *optional)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, t in dict(q_latent=q_latent, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe, c_kv_scale=c_kv_scale).items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim (call .contiguous())")
    rows = q_latent.shape[0]
    if seq_lens.shape != (rows,):
        raise ValueError(f"seq_lens must be [rows] = [{rows}], got {tuple(seq_lens.shape)}")
    batch = c_kv.shape[0] if block_table is None else block_table.shape[0]
    if block_table is not None and (block_table.ndim != 2 or block_table.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"block_table must be an int32 [batch, max_blocks] tensor, got {block_table.dtype}")
    if batch == 0 or rows % batch:
        raise ValueError(
            f"query rows ({rows}) must be a multiple of the cache batch ({batch}): row r reads sequence "
            f"r // (rows / batch)"
        )
    if key_mask is not None:
        t_max = c_kv.shape[1] if block_table is None else block_table.shape[1] * c_kv.shape[1]
        if key_mask.dtype != torch.bool or key_mask.ndim not in (2, 3) or key_mask.shape[-1] < 1:
            raise ValueError(
                f"key_mask must be a bool [rows, T] or [batch, rows/batch, T] tensor, got {key_mask.dtype} "
                f"{tuple(key_mask.shape)}"
            )
        if key_mask.ndim == 2 and key_mask.shape[0] != rows:
            raise ValueError(f"key_mask has {key_mask.shape[0]} rows, expected {rows}")
        if key_mask.ndim == 3 and key_mask.shape[0] * key_mask.shape[1] != rows:
            raise ValueError(f"key_mask {tuple(key_mask.shape)} does not cover {rows} query rows")
        if key_mask.shape[-1] < t_max:
            raise ValueError(f"key_mask covers {key_mask.shape[-1]} keys but the cache holds up to {t_max}")


def mla_decode(
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
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-space MLA decode attention.

    Args:
        q_latent: absorbed queries ``[R, H, d_c]`` (``q_nope @ W_UK``); R query rows, R a multiple of the batch B.
        q_pe: rotated rope queries ``[R, H, d_r]``.
        c_kv: latent cache ``[B, T, d_c]``, or ``[num_blocks, page_size, d_c]`` with ``block_table``; in the
            queries' dtype, or float8_e4m3fn with ``c_kv_scale``.
        k_pe: rope-key cache, same leading dims as ``c_kv`` (both may be views of one ``[.., d_c + d_r]`` buffer);
            in the queries' dtype (any of fp16/bf16/fp32 with an fp8 ``c_kv``: bf16 in the FlashMLA layout).
        seq_lens: int ``[R]``: row r attends to tokens ``0 .. seq_lens[r]-1`` of sequence ``r // (R / B)``. Not
            checked against the cache's capacity (that would need a device sync, which CUDA graphs forbid): a
            length past it reads out of bounds.
        softmax_scale: the pre-absorption scale ``(d_n + d_r)**-0.5`` (times YaRN's mscale**2).
        c_kv_scale: fp32 ``[B, T, d_c / FP8_GROUP_SIZE]`` (same leading dims as ``c_kv``) for an e4m3 ``c_kv``:
            value ``i`` of a token is ``c_kv[.., i] * c_kv_scale[.., i // FP8_GROUP_SIZE]``; None otherwise.
        block_table: int32 ``[B, max_blocks]`` of page ids (paged cache); None for a contiguous cache.
        key_mask: optional bool ``[R, T]`` or ``[B, R/B, T]``; False drops a key (combined with ``seq_lens``).
        num_splits: splits per sequence (None = :func:`choose_num_splits`).
        config: launch parameters (None = :func:`default_config`).
        out, lse: caller-owned outputs, contiguous ``[R, H, d_c]`` in the queries' dtype and ``[R, H]`` fp32
            (None = allocated per call). With ``workspace`` a call allocates nothing, as in a CUDA graph.
        workspace: caller-owned fp32 scratch of the split partials, from :func:`decode_workspace` for this call's
            shapes (None = allocated per call when the call splits; ignored when it does not).

    Returns:
        ``(out [R, H, d_c]`` in the input dtype, ``lse [R, H]`` fp32, natural log of the sum of exp(scores)).
        A row with no key gets ``out = 0`` and ``lse = -inf``.
    """
    key = (
        _meta(q_latent),
        _meta(q_pe),
        _meta(c_kv),
        _meta(k_pe),
        _meta(seq_lens),
        _meta(c_kv_scale),
        _meta(block_table),
        _meta(key_mask),
        num_splits,
        config,
        _meta(out),
        _meta(lse),
        _meta(workspace),
    )
    plan = None if torch.compiler.is_compiling() else _PLANS.get(key)  # Dynamo traces the checks and the plan
    if plan is None:
        _check_inputs(q_latent, q_pe, c_kv, k_pe, seq_lens, block_table, key_mask, c_kv_scale)
        plan = _make_plan(q_latent, q_pe, c_kv, k_pe, seq_lens, c_kv_scale, block_table, key_mask, num_splits, config)
        _check_buffers(plan, q_latent, out, lse, workspace)
        if not torch.compiler.is_compiling():
            if len(_PLANS) >= MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan

    device = q_latent.device
    if plan.convert_lens:
        seq_lens = seq_lens.to(torch.int32).contiguous()
    if block_table is None:
        block_table = seq_lens  # never read (PAGED=False)
    elif plan.convert_table:
        block_table = block_table.to(torch.int32).contiguous()
    key_mask = seq_lens if key_mask is None else key_mask.view(torch.uint8)  # never read without HAS_MASK
    if out is None:
        out = torch.empty(plan.out_shape, device=device, dtype=q_latent.dtype)
    if lse is None:
        lse = torch.empty(plan.out_shape[:2], device=device, dtype=torch.float32)
    part_out, part_lse = _stage1_outputs(plan, out, lse, workspace)
    _STAGE1(
        plan,
        plan.grid1,
        (q_latent, q_pe, c_kv, k_pe, c_kv if c_kv_scale is None else c_kv_scale, seq_lens, block_table, key_mask,
         part_out, part_lse),
        (softmax_scale * LOG2E, *plan.stage1_ints),
        plan.stage1_constexprs,
        plan.stage1_options,
    )  # fmt: skip
    if plan.splits > 1:
        _STAGE2(plan, plan.grid2, (part_out, part_lse, out, lse), plan.stage2_ints, plan.stage2_constexprs, {})
    return out, lse


def _stage1_outputs(plan: "_Plan", out, lse, workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Where stage 1 writes: ``out`` and ``lse`` themselves with one split; else one fp32 scratch (``workspace``, or
    allocated) holding the partial outputs ``[R, H, S, d_c]`` and then their log2-sum-exps ``[R, H, S]``."""
    if plan.splits == 1:
        return out, lse
    scratch = workspace
    if scratch is None:
        scratch = torch.empty(plan.scratch_numel, device=out.device, dtype=torch.float32)
    return scratch, scratch[plan.part_lse_offset :]


def decode_workspace(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    c_kv_scale: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """The fp32 scratch an :func:`mla_decode` call with these arguments needs (``R * H * splits * (d_c + 1)``
    values; none when it does not split). Allocate once, pass as ``workspace=`` to every call of these shapes."""
    _check_inputs(q_latent, q_pe, c_kv, k_pe, seq_lens, block_table, key_mask, c_kv_scale)
    plan = _make_plan(q_latent, q_pe, c_kv, k_pe, seq_lens, c_kv_scale, block_table, key_mask, num_splits, config)
    return torch.empty(plan.scratch_numel if plan.splits > 1 else 0, device=q_latent.device, dtype=torch.float32)


def _check_buffers(plan, q_latent, out, lse, workspace) -> None:
    """Caller-owned outputs and scratch: what the launch writes must fit them (once per plan, not per call)."""
    device = q_latent.device
    for name, t, shape, dtype in (
        ("out", out, plan.out_shape, q_latent.dtype),
        ("lse", lse, plan.out_shape[:2], torch.float32),
    ):
        if t is not None and (
            tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous()
        ):
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got "
                f"{t.dtype} {list(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"
            )
    if workspace is not None and plan.splits > 1:
        if workspace.dtype != torch.float32 or workspace.device != device or not workspace.is_contiguous():
            raise ValueError(f"workspace must be a contiguous float32 tensor on {device}: use decode_workspace(...)")
        if workspace.numel() < plan.scratch_numel:
            raise ValueError(
                f"workspace holds {workspace.numel()} values, this call needs {plan.scratch_numel} "
                f"({plan.splits} splits): allocate it with decode_workspace(...) for these shapes"
            )


def _meta(t: torch.Tensor | None) -> tuple | None:
    """What the checks and the launch read of a tensor (a plan's key): never its data."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


@dataclass(frozen=True, eq=False)  # hashed by identity: one plan object per key of ``_PLANS``
class _Plan:
    """Everything of an ``mla_decode`` call that follows from its tensors' shapes, strides, dtypes and device."""

    out_shape: tuple[int, int, int]  # [R, H, d_c]
    scratch_numel: int  # fp32 values of the split partials (R * H * splits * (d_c + 1); unused with one split)
    part_lse_offset: int  # where the partial log2-sum-exps start in it
    splits: int
    convert_lens: bool  # seq_lens is not a contiguous int32 tensor (the kernels read it densely)
    convert_table: bool  # block_table is not int32 with unit column stride (then copied to a dense one)
    grid1: tuple[int, int, int]
    stage1_ints: tuple  # the stage-1 scalars after qk_scale
    stage1_constexprs: tuple
    stage1_options: dict
    grid2: tuple[int, int, int]
    stage2_ints: tuple
    stage2_constexprs: tuple


MAX_PLANS = 1024
_PLANS: dict[tuple, _Plan] = {}
_STAGE1 = CompiledLauncher(_mla_decode_stage1)
_STAGE2 = CompiledLauncher(_mla_decode_stage2)


def _make_plan(
    q_latent, q_pe, c_kv, k_pe, seq_lens, c_kv_scale, block_table, key_mask, num_splits, config, sms=None
) -> _Plan:
    rows, num_heads, d_c = q_latent.shape
    d_r = q_pe.shape[2]
    paged = block_table is not None
    page_size = c_kv.shape[1] if paged else 1
    max_len = block_table.shape[1] * page_size if paged else c_kv.shape[1]
    sms = sms or num_sms(q_latent.device)
    fp8 = c_kv_scale is not None
    cfg = config or default_config(num_heads, rows, sms, max_len, fp8=fp8)
    block_h = max(MMA_MIN_ROWS, min(cfg.block_h, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    splits = num_splits or choose_num_splits(rows, head_blocks, max_len, sms, cfg)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    combine_block = min(64, triton.next_power_of_2(d_c))  # latent values per stage-2 program
    batch = block_table.shape[0] if paged else c_kv.shape[0]
    queries_per_seq = rows // batch
    convert_lens = seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous()
    convert_table = paged and (block_table.dtype != torch.int32 or block_table.stride(1) != 1)
    out_strides = (num_heads * d_c, d_c)  # contiguous [R, H, d_c] and [R, H] outputs, allocated per call
    lse_strides = (num_heads, 1)
    if splits == 1:
        po_strides, pl_strides = (*out_strides, 0), lse_strides
    else:
        po_strides, pl_strides = (num_heads * splits * d_c, splits * d_c, d_c), (num_heads * splits, splits)
    if key_mask is None:
        km_strides = (0, 0, 0)
    elif key_mask.ndim == 2:  # row r = b * qps + s
        km_strides = (key_mask.stride(0) * queries_per_seq, key_mask.stride(0), key_mask.stride(1))
    else:
        km_strides = tuple(key_mask.stride())
    kpe_stride_unit = math.gcd(16 // k_pe.element_size(), *k_pe.stride()[:2])
    stage1_ints = (
        num_heads,
        queries_per_seq,
        splits,
        *q_latent.stride()[:2],
        *q_pe.stride()[:2],
        *c_kv.stride()[:2],
        *(stride // kpe_stride_unit for stride in k_pe.stride()[:2]),
        *((0, 0) if c_kv_scale is None else c_kv_scale.stride()[:2]),
        (block_table.shape[1] if convert_table else block_table.stride(0)) if paged else 0,
        *km_strides,
        *po_strides,
        *pl_strides,
    )
    stage1_constexprs = _STAGE1.constexpr_values(
        D_C=d_c,
        D_R=d_r,
        BLOCK_C=max(MMA_MIN_ROWS, triton.next_power_of_2(d_c)),
        BLOCK_R=max(MMA_MIN_ROWS, triton.next_power_of_2(d_r)),
        BLOCK_H=block_h,
        BLOCK_N=cfg.block_n,
        MIN_SPLIT=max(cfg.block_n, cfg.min_split_tokens),
        PAGE_SIZE=page_size,
        PAGED=paged,
        HAS_MASK=key_mask is not None,
        DIRECT=splits == 1,
        IEEE=q_latent.dtype == torch.float32,
        NUM_STAGES=cfg.num_stages,
        FP8=fp8,
        GROUP=FP8_GROUP_SIZE,
        NUM_GROUPS=d_c // FP8_GROUP_SIZE,
        FP8_F16=fp8
        and (q_latent.dtype == torch.float16 or (cfg.fp8_mma == "fp16" and q_latent.dtype == torch.bfloat16)),
        FP8_RELOAD=fp8 and cfg.fp8_reload,
        KPE_STRIDE_UNIT=kpe_stride_unit,
    )
    return _Plan(
        out_shape=(rows, num_heads, d_c),
        scratch_numel=rows * num_heads * splits * (d_c + 1),
        part_lse_offset=rows * num_heads * splits * d_c,
        splits=splits,
        convert_lens=convert_lens,
        convert_table=convert_table,
        grid1=(head_blocks, splits, rows),
        stage1_ints=stage1_ints,
        stage1_constexprs=stage1_constexprs,
        stage1_options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        grid2=(rows, num_heads, triton.cdiv(d_c, combine_block)),
        stage2_ints=(splits, *po_strides, *pl_strides, *out_strides, *lse_strides),
        stage2_constexprs=_STAGE2.constexpr_values(
            D_C=d_c,
            BLOCK_C=combine_block,
            BLOCK_S=min(32, triton.next_power_of_2(splits)),
            BLOCK_ALL_S=triton.next_power_of_2(splits),
        ),
    )


def stage1_compile_report(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    c_kv_scale: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    sms: int = 132,
    capability: int = 90,
) -> dict:
    """What the compiler makes of the stage-1 kernel that :func:`mla_decode` would launch with these arguments on a
    GPU of compute ``capability`` with ``sms`` SMs (default: an H100/H200), compiled on any machine: registers,
    spills, shared memory, pipelined loads and MMA kinds (:func:`~mla_kernels.triton_launch.compile_report`), plus
    the plan's split count and launch options. The tensors may be CPU tensors (only their metadata is read; the
    cache may be ``torch.empty``)."""
    from mla_kernels.triton_launch import compile_for_target, compile_report

    plan = _make_plan(q_latent, q_pe, c_kv, k_pe, seq_lens, c_kv_scale, None, None, None, config, sms=sms)
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty(plan.out_shape, dtype=q_latent.dtype)
    part_out, part_lse = _stage1_outputs(plan, out, torch.empty(plan.out_shape[:2], dtype=torch.float32), None)
    pointers = (q_latent, q_pe, c_kv, k_pe, c_kv if c_kv_scale is None else c_kv_scale, seq_lens, seq_lens, seq_lens,
                part_out, part_lse)  # fmt: skip
    kwargs = dict(zip(_STAGE1.constexpr_names, plan.stage1_constexprs, strict=True))
    kernel = compile_for_target(
        _mla_decode_stage1, (*pointers, 0.1, *plan.stage1_ints), {**kwargs, **plan.stage1_options}, capability
    )
    return {"splits": plan.splits, "grid": plan.grid1, **plan.stage1_options, **compile_report(kernel)}


def last_stage1_report() -> dict:
    """Registers, spills and shared memory of the most recent stage-1 launch (the compiler's view; GPU only)."""
    kernel = _STAGE1.last_kernel
    if kernel is None or not hasattr(kernel, "n_regs"):
        return {}
    return dict(n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared_bytes=kernel.metadata.shared)


def decode_bytes(
    seq_lens_total: int, rows: int, num_heads: int, d_c: int, d_r: int, itemsize: int, fp8_cache: bool = False
) -> int:
    """Bytes a decode step must move: the latent cache once, the queries in, the latent output out. With
    ``fp8_cache`` the cache rows are FlashMLA's: 1 B per latent value, 4 B per scale group, the rope key in bf16."""
    row = d_c + 4 * (d_c // FP8_GROUP_SIZE) + 2 * d_r if fp8_cache else (d_c + d_r) * itemsize
    return seq_lens_total * row + rows * num_heads * (d_c + d_r + d_c) * itemsize


def decode_flops(seq_lens_total: int, num_heads: int, d_c: int, d_r: int) -> int:
    """Multiply-adds x2 of ``Q K^T`` (d_c + d_r) and ``P V`` (d_c) for every head and key."""
    return 2 * num_heads * seq_lens_total * (d_c + d_r + d_c)


__all__ = [
    "DecodeConfig",
    "choose_num_splits",
    "decode_bytes",
    "decode_flops",
    "decode_workspace",
    "default_config",
    "last_stage1_report",
    "mla_decode",
    "num_sms",
    "stage1_compile_report",
]
