"""The fused MLA decode kernel against an fp64 reference (CPU: Triton interpreter; GPU: native).

Every run allocates through a poisoned ``torch.empty`` (NaN floats, -1 ints), so outputs and split scratch that
the kernels fail to write show up as NaN or wrong values.
"""

import dataclasses
import math

import pytest
import torch

from tests._requirements import require_module

require_module("triton", 'pip install -e ".[triton]"')

import mla_kernels.mla_decode as mla_decode_module  # noqa: E402
from mla_kernels.fp8 import FP8_GROUP_SIZE, dequantize_latent_fp8, fp8_row_views, quantize_latent_fp8  # noqa: E402
from mla_kernels.mla_decode import (  # noqa: E402
    DecodeConfig,
    choose_num_splits,
    decode_bytes,
    decode_workspace,
    default_config,
    mla_decode,
    num_sms,
)
from mla_kernels.reference import mla_decode_reference  # noqa: E402

# Small tiles so that short sequences still cover several tiles and splits.
SMALL = DecodeConfig(block_n=16, min_split_tokens=16)


def make_inputs(rows, heads, d_c, d_r, batch, tokens, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(rows, heads, d_c, generator=gen).to(device, dtype)
    q_pe = torch.randn(rows, heads, d_r, generator=gen).to(device, dtype)
    # one buffer holding [c_kv | k_pe] per token, like MLAKVCache
    cache = torch.randn(batch, tokens, d_c + d_r, generator=gen).to(device, dtype)
    return q_latent, q_pe, cache[..., :d_c], cache[..., d_c:]


def check(got, want, atol, rtol=0.0):
    out, lse = got
    ref_out, ref_lse = want
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    assert not torch.isnan(lse).any(), "unwritten (NaN-poisoned) lse elements"
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), atol=atol, rtol=rtol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu())
    torch.testing.assert_close(lse.double().cpu()[finite.cpu()], ref_lse.cpu()[finite.cpu()], atol=atol, rtol=rtol)


@pytest.mark.parametrize("heads", [1, 5, 16])
@pytest.mark.parametrize("splits", [1, 3, None], ids=["one_split", "three_splits", "auto_splits"])
def test_ragged_contiguous_odd_lengths(poisoned, device, heads, splits):
    # lengths: 1, odd, a multiple of the tile, not a multiple of it, the whole cache
    lens = torch.tensor([1, 17, 32, 45, 64], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(5, heads, 64, 16, 5, 64, device)
    scale = 1 / math.sqrt(24)
    got = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, scale, num_splits=splits, config=SMALL)
    check(got, mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, scale), atol=2e-5)


def test_128_heads_and_widths_that_are_not_powers_of_two(poisoned, device):
    lens = torch.tensor([23, 9], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 128, 40, 8, 2, 24, device, seed=1)
    got = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.2, num_splits=2, config=SMALL)
    check(got, mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.2), atol=2e-5)


def _paged_inputs(device, page_size, heads, rows=3, seed=2):
    """``rows`` sequences over a shuffled page pool with spare pages that no sequence owns."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = 48 // page_size
    num_blocks = rows * max_blocks + 2
    q_latent, q_pe, _, _ = make_inputs(rows, heads, 32, 16, 1, 1, device, seed=seed + 1)
    pages = torch.randn(num_blocks, page_size, 48, generator=gen).to(device)
    block_table = torch.randperm(num_blocks, generator=gen)[: rows * max_blocks].view(rows, max_blocks)
    return q_latent, q_pe, pages[..., :32], pages[..., 32:], block_table.to(device=device, dtype=torch.int32)


@pytest.mark.parametrize("page_size", [16, 8])
@pytest.mark.parametrize("heads", [1, 5, 16])
@pytest.mark.parametrize("splits", [1, 2, None], ids=["one_split", "two_splits", "auto_splits"])
def test_paged_cache_with_permuted_block_table(poisoned, device, page_size, heads, splits):
    lens = torch.tensor([5, 40, 31], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe, block_table = _paged_inputs(device, page_size, heads)
    got = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=block_table, num_splits=splits, config=SMALL)
    want = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=block_table)
    check(got, want, atol=2e-5)


@pytest.mark.parametrize("table_dtype", [torch.int64, torch.int32])
def test_index_tensors_as_views_of_larger_ones(poisoned, device, table_dtype):
    """A block table sliced from a wider one (any int dtype) and lengths read with a stride: the kernels read
    dense int32 copies where the layout needs one, on the first call of the shape and on later ones."""
    lens = torch.tensor([5, 0, 40, 0, 31, 0], dtype=torch.int32, device=device)[::2]
    q_latent, q_pe, c_kv, k_pe, block_table = _paged_inputs(device, 16, 5)
    wide = torch.zeros(3, 7, dtype=table_dtype, device=device)
    wide[:, : block_table.shape[1]] = block_table
    table = wide[:, : block_table.shape[1]]
    want = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens.contiguous(), 0.3, block_table=block_table)
    for _ in range(2):
        got = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=table, config=SMALL)
        check(got, want, atol=2e-5)


def test_paged_cache_with_a_key_mask(poisoned, device):
    """Paged pages and a per-row key mask together (left padding), 128 heads."""
    lens = torch.tensor([40, 33], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe, block_table = _paged_inputs(device, 16, 128, rows=2, seed=7)
    mask = torch.ones(2, 1, 48, dtype=torch.bool)
    mask[1, :, :9] = False
    mask = mask.to(device)
    got = mla_decode(
        q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=block_table, key_mask=mask, num_splits=2, config=SMALL
    )
    want = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=block_table, key_mask=mask)
    check(got, want, atol=2e-5)


def test_key_mask_and_several_queries_per_sequence(poisoned, device):
    """Two query rows per sequence (a 2-token decode step) with left-padding/causal masks, as in generation."""
    batch, per_seq, tokens = 2, 2, 40
    q_latent, q_pe, c_kv, k_pe = make_inputs(batch * per_seq, 4, 32, 16, batch, tokens, device, seed=4)
    mask = torch.ones(batch, per_seq, tokens, dtype=torch.bool)
    mask[0, :, :7] = False  # left padding of sequence 0
    mask[:, 0, 37] = False  # causal: the first query row does not see the second new token
    mask = mask.to(device)
    lens = torch.full((batch * per_seq,), 38, dtype=torch.int32, device=device)
    got = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.25, key_mask=mask, num_splits=3, config=SMALL)
    want = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.25, key_mask=mask)
    check(got, want, atol=2e-5)


def test_empty_sequence_gives_zero_output_and_minus_inf_lse(poisoned, device):
    lens = torch.tensor([0, 3], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 2, 32, 16, 2, 16, device, seed=5)
    for splits in (1, 2):
        out, lse = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, num_splits=splits, config=SMALL)
        assert torch.equal(out[0].cpu(), torch.zeros_like(out[0]).cpu())
        assert torch.isneginf(lse[0]).all()
        check((out, lse), mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.3), atol=2e-5)


def test_fp16_inputs(poisoned, device):
    lens = torch.tensor([33, 50], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 5, 64, 16, 2, 50, device, dtype=torch.float16, seed=6)
    out, lse = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.1, num_splits=2, config=SMALL)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    check((out, lse), mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.1), atol=2e-3, rtol=2e-3)


def test_bad_inputs_raise_before_launch(device):
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 4, 32, 16, 2, 16, device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens[:1], 0.3)
    with pytest.raises(ValueError, match="latent/rope widths"):
        mla_decode(q_latent, q_pe, c_kv[..., :16], k_pe, lens, 0.3)
    with pytest.raises(ValueError, match="share one of"):
        mla_decode(q_latent.half(), q_pe, c_kv, k_pe, lens, 0.3)
    with pytest.raises(ValueError, match="multiple of the cache batch"):
        mla_decode(q_latent, q_pe, c_kv[:1].expand(3, -1, -1)[:3], k_pe[:1].expand(3, -1, -1), lens, 0.3)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, num_splits=10_000)


def test_split_heuristic_fills_the_gpu_and_respects_lengths():
    cfg = DecodeConfig(ctas_per_sm=2, min_split_tokens=256)
    # batch 1 at 128k: enough splits for 2 programs per SM on 132 SMs
    assert choose_num_splits(1, 1, 131072, 132, cfg) == 264
    # large batch already fills the GPU: no split pass
    assert choose_num_splits(512, 1, 4096, 132, cfg) == 1
    # short sequences: never below min_split_tokens per split
    assert choose_num_splits(1, 1, 1000, 132, cfg) == 4
    # the fp8 kernel is latency-bound: one row gets two programs per SM (H200 sweep), bf16 one
    assert default_config(16, 1, 132, 131072, fp8=True).ctas_per_sm == 2
    assert default_config(16, 1, 132, 131072).ctas_per_sm == 1
    # H=128 in 8 head blocks needs fewer splits per sequence
    assert choose_num_splits(1, 8, 131072, 132, cfg) == 33


def test_checks_and_launch_arguments_are_derived_once_per_call_shape(poisoned, device, monkeypatch):
    """A decode step's host time: after the first call of a shape, one dictionary lookup replaces the input checks,
    the config, the split choice and the launch arguments. Another split count, head count or stride is another
    plan, and a tensor with the same shapes and strides at another (unaligned) address reuses the plan and stays
    exact (on CUDA it launches a kernel compiled for unaligned pointers)."""
    made = []
    make_plan = mla_decode_module._make_plan
    monkeypatch.setattr(mla_decode_module, "_make_plan", lambda *args: made.append(1) or make_plan(*args))
    mla_decode_module._PLANS.clear()
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 3, 32, 16, 2, 40, device, seed=4)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=device)
    for _ in range(3):
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, config=SMALL)
    assert len(made) == 1
    mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, config=SMALL, num_splits=2)
    mla_decode(q_latent[:, :2], q_pe[:, :2], c_kv, k_pe, lens, 0.3, config=SMALL)
    mla_decode(q_latent, q_pe, c_kv.contiguous(), k_pe, lens, 0.3, config=SMALL)
    assert len(made) == 4

    shifted = torch.empty(q_latent.numel() + 1, device=device, dtype=q_latent.dtype)[1:].view_as(q_latent)
    shifted.copy_(q_latent * 2)
    assert shifted.stride() == q_latent.stride() and shifted.data_ptr() % 16
    got = mla_decode(shifted, q_pe, c_kv, k_pe, lens, 0.3, config=SMALL)
    assert len(made) == 4
    check(got, mla_decode_reference(shifted, q_pe, c_kv, k_pe, lens, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 3], ids=["one_split", "three_splits"])
def test_caller_owned_outputs_and_workspace_allocate_nothing_and_give_the_same_bits(poisoned, device, splits):
    """``out``, ``lse`` and ``workspace`` (sized by ``decode_workspace``) are written in place: the call allocates
    nothing, returns the caller's tensors and the same bits as a call that allocates its own."""
    q_latent, q_pe, c_kv, k_pe = make_inputs(3, 5, 64, 16, 3, 48, device, seed=12)
    lens = torch.tensor([48, 1, 30], dtype=torch.int32, device=device)
    args = (q_latent, q_pe, c_kv, k_pe, lens)
    workspace = decode_workspace(*args, num_splits=splits, config=SMALL)
    assert workspace.numel() == (0 if splits == 1 else 3 * 5 * splits * (64 + 1))
    out = torch.empty(3, 5, 64, device=device)
    lse = torch.empty(3, 5, device=device)
    want = mla_decode(*args, 0.2, num_splits=splits, config=SMALL)
    allocations = []
    empty = torch.empty
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or empty(*a, **k))
        for _ in range(2):  # the plan's first call (checks the buffers) and a cached one
            got = mla_decode(*args, 0.2, num_splits=splits, config=SMALL, out=out, lse=lse, workspace=workspace)
    assert allocations == []
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    check(got, mla_decode_reference(*args, 0.2), atol=2e-5)


def test_caller_owned_buffers_that_do_not_fit_are_refused_naming_them(device):
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 4, 32, 16, 2, 40, device, seed=13)
    args = (q_latent, q_pe, c_kv, k_pe, torch.tensor([40, 9], dtype=torch.int32, device=device), 0.3)
    kwargs = dict(num_splits=2, config=SMALL)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \[2, 4, 32\]"):
        mla_decode(*args, **kwargs, out=torch.empty(2, 4, 16, device=device))
    with pytest.raises(ValueError, match="out must be .* got torch.bfloat16"):
        mla_decode(*args, **kwargs, out=torch.empty(2, 4, 32, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"lse must be .*\(not contiguous\)"):
        mla_decode(*args, **kwargs, lse=torch.empty(4, 2, device=device).t())
    with pytest.raises(ValueError, match=r"workspace holds 10 values, this call needs 528 \(2 splits\)"):
        mla_decode(*args, **kwargs, workspace=torch.empty(10, device=device))
    with pytest.raises(ValueError, match="workspace must be a contiguous float32 tensor"):
        mla_decode(*args, **kwargs, workspace=torch.empty(528, device=device, dtype=torch.float16))
    # a workspace from decode_workspace for other shapes is refused too, not overrun
    small = decode_workspace(*args[:5], num_splits=2, config=SMALL)
    with pytest.raises(ValueError, match="this call needs 1056 .4 splits."):
        mla_decode(*args, num_splits=4, config=SMALL, workspace=small)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize("splits", [1, None], ids=["one_split", "auto_splits"])
def test_compiled_launches_equal_tritons_own_on_gpu(monkeypatch, fp8, splits):
    """Every CUDA launch goes through ``mla_kernels.triton_launch`` (the compiled kernel's launcher, called with
    raw addresses); the same call through Triton's own ``kernel[grid](...)`` gives the same bits, also from an
    unaligned query view and inside a CUDA graph."""
    device = torch.device("cuda")
    lens = torch.tensor([3000, 17], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 16, 512, 64, 2, 3072, device, dtype=torch.bfloat16, seed=9)
    extra = {}
    if fp8:
        c_kv, extra["c_kv_scale"] = quantize_latent_fp8(c_kv)
    shifted = torch.empty(q_latent.numel() + 1, device=device, dtype=q_latent.dtype)[1:].view_as(q_latent)
    shifted.copy_(q_latent)

    def decode(q):
        return mla_decode(q, q_pe, c_kv, k_pe, lens, 0.1, num_splits=splits, **extra)

    compiled = [decode(q_latent), decode(shifted)]
    assert mla_decode_module._STAGE1._kernels, "the compiled launch path was not taken"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode(q_latent)
    graph.replay()
    torch.cuda.synchronize()
    for launcher in (mla_decode_module._STAGE1, mla_decode_module._STAGE2):
        monkeypatch.setattr(launcher, "compiled_launch", False)
    tritons = [decode(q_latent), decode(shifted)]
    for got, want in zip([*compiled, captured], [*tritons, tritons[0]], strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_under_torch_compile_on_gpu():
    """Under torch.compile a call builds its plan inline and launches through Triton (which Dynamo understands)."""
    device = torch.device("cuda")
    lens = torch.tensor([3000, 17], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 16, 512, 64, 2, 3072, device, dtype=torch.bfloat16, seed=10)
    eager = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.1)
    compiled = torch.compile(lambda *args: mla_decode(*args, 0.1))
    got = compiled(q_latent, q_pe, c_kv, k_pe, lens)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged64"])
def test_bf16_real_shapes_on_gpu(heads, paged):
    """DeepSeek-V3 widths (512 + 64), bf16, ragged lengths up to 9k, auto split count."""
    device = torch.device("cuda")
    lens = torch.tensor([9001, 1, 4096, 777], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(4, heads, 512, 64, 4, 9024, device, dtype=torch.bfloat16, seed=7)
    block_table = None
    if paged:
        pages = torch.cat([c_kv, k_pe], dim=-1).reshape(4 * 9024 // 64, 64, 576)
        perm = torch.randperm(pages.shape[0], device=device)
        pages = pages[perm]  # page i of the new pool is old page perm[i]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=device)
        block_table = inverse.view(4, 9024 // 64).to(torch.int32)
        c_kv, k_pe = pages[..., :512], pages[..., 512:]
    scale = 192**-0.5
    out, lse = mla_decode(q_latent, q_pe, c_kv, k_pe, lens, scale, block_table=block_table)
    ref_out, ref_lse = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, scale, block_table=block_table)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref_out.flatten(), dim=0)
    assert cos > 0.99999


def test_block_table_and_key_mask_must_be_on_the_inputs_device(device):
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 4, 32, 16, 2, 16, device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    other = torch.device("meta")  # a device no input is on
    with pytest.raises(ValueError, match="one device"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, key_mask=torch.ones(2, 16, dtype=torch.bool, device=other))
    with pytest.raises(ValueError, match="one device"):
        table = torch.zeros(2, 1, dtype=torch.int32, device=other)
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, block_table=table)


# ---------------------------------------------------------------------------------------------- FP8 latent cache
def fp8_rows(c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's rows (e4m3 latent, fp32 group scales, bf16 rope key) in one uint8 buffer, as ``MLAKVCache``
    stores them; returns the strided views ``(c_kv e4m3, c_kv_scale fp32, k_pe bf16)``."""
    values, scale = quantize_latent_fp8(c_kv)
    rope = k_pe.to(torch.bfloat16).contiguous()
    rows = torch.cat([values.view(torch.uint8), scale.view(torch.uint8), rope.view(torch.uint8)], dim=-1)
    return fp8_row_views(rows, c_kv.shape[-1])


def test_fp8_quantisation_error_is_within_half_an_e4m3_step():
    """Round to nearest with 3 mantissa bits: |error| <= 2^-4 |x| for normal e4m3 values, plus half the subnormal
    step (2^-10 in scaled units) near zero; each group's largest magnitude is exact (it maps to 448)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 512, generator=gen) * torch.logspace(-3, 2, 50)[None, :, None]
    x[0, 0, :128] = 0.0  # an all-zero group: scale 1, values 0
    values, scale = quantize_latent_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (3, 50, 4) and scale.dtype == torch.float32
    back = dequantize_latent_fp8(values, scale, torch.float32)
    per_value_scale = scale.repeat_interleave(FP8_GROUP_SIZE, dim=-1)
    bound = 2.0**-4 * x.abs() + 2.0**-10 * per_value_scale
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    groups = x.unflatten(-1, (4, 128)).abs()
    top = groups.argmax(-1, keepdim=True)
    torch.testing.assert_close(
        back.unflatten(-1, (4, 128)).abs().gather(-1, top), groups.gather(-1, top), rtol=1e-6, atol=0
    )
    assert torch.equal(back[0, 0, :128], torch.zeros(128))
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_latent_fp8(torch.randn(2, 96))


@pytest.mark.parametrize("heads", [1, 16])
@pytest.mark.parametrize("splits", [1, 3], ids=["one_split", "three_splits"])
@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_cache_in_656_byte_rows_matches_the_reference(poisoned, device, heads, splits, reload):
    """e4m3 latent + per-group scales + bf16 rope, strided views of one 656-byte row per token: the kernel
    dequantises in its loads; the fp64 reference dequantises up front. Same arithmetic, so the fp32 tolerance."""
    lens = torch.tensor([1, 45, 64], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(3, heads, 512, 64, 3, 64, device, seed=8)
    c8, scale, k_pe16 = fp8_rows(c_kv, k_pe)
    assert c8.stride(1) * c8.element_size() == 656 and scale.stride(1) == 164 and k_pe16.stride(1) == 328
    config = dataclasses.replace(SMALL, fp8_reload=reload)
    got = mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.1, c_kv_scale=scale, num_splits=splits, config=config)
    want = mla_decode_reference(q_latent, q_pe, c8, k_pe16, lens, 0.1, c_kv_scale=scale)
    check(got, want, atol=2e-5)


@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_latent_of_three_groups(poisoned, device, reload):
    """d_c = 384: three scale groups, three accumulators (the fourth is never touched)."""
    lens = torch.tensor([70, 9], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 3, 384, 32, 2, 70, device, seed=12)
    c8, scale, k_pe16 = fp8_rows(c_kv, k_pe)
    config = dataclasses.replace(SMALL, fp8_reload=reload)
    got = mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.1, c_kv_scale=scale, num_splits=2, config=config)
    check(got, mla_decode_reference(q_latent, q_pe, c8, k_pe16, lens, 0.1, c_kv_scale=scale), atol=2e-5)


@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_paged_cache_with_a_key_mask(poisoned, device, reload):
    gen = torch.Generator().manual_seed(9)
    page_size, max_blocks, rows = 16, 3, 2
    num_blocks = rows * max_blocks + 1
    q_latent, q_pe, _, _ = make_inputs(rows, 5, 128, 16, 1, 1, device, seed=10)
    pages = torch.randn(num_blocks, page_size, 128 + 16, generator=gen).to(device)
    c8, scale, k_pe16 = fp8_rows(pages[..., :128], pages[..., 128:])
    block_table = torch.randperm(num_blocks, generator=gen)[: rows * max_blocks].view(rows, max_blocks)
    block_table = block_table.to(device=device, dtype=torch.int32)
    mask = torch.ones(rows, 1, 48, dtype=torch.bool)
    mask[1, :, :5] = False
    mask = mask.to(device)
    lens = torch.tensor([30, 48], dtype=torch.int32, device=device)
    kwargs = dict(c_kv_scale=scale, block_table=block_table, key_mask=mask)
    config = dataclasses.replace(SMALL, fp8_reload=reload)
    got = mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.3, num_splits=2, config=config, **kwargs)
    check(got, mla_decode_reference(q_latent, q_pe, c8, k_pe16, lens, 0.3, **kwargs), atol=2e-5)


@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_half_precision_queries_against_the_unquantised_cache(poisoned, device, reload):
    """16-bit queries over the fp8 cache vs the fp64 attention over the original (unquantised) values: the output
    error stays within the e4m3 round-off of the values it averages (<= 2^-4 relative each, see the test above).

    bf16 on CUDA; fp16 under the interpreter, whose ``tl.dot`` multiplies bf16 operands' raw bit patterns (Triton
    3.6.0: a 16x16 bf16 ``tl.dot`` is off by ~3e10; fp16 and e4m3 operands are exact)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    lens = torch.tensor([200, 77], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 16, 512, 64, 2, 200, device, seed=11)
    q_latent, q_pe = (q_latent * 0.05).to(dtype), q_pe.to(dtype)
    c8, scale, k_pe16 = fp8_rows(c_kv, k_pe)
    config = dataclasses.replace(SMALL, fp8_reload=reload)
    out, lse = mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.1, c_kv_scale=scale, num_splits=2, config=config)
    ref_out, ref_lse = mla_decode_reference(q_latent, q_pe, c_kv, k_pe, lens, 0.1)
    assert out.dtype == dtype
    rel = (out.double().cpu() - ref_out.cpu()).norm() / ref_out.cpu().norm()
    assert rel < 2.0**-4, rel


@pytest.mark.parametrize("magnitude", [1.0e-6, 0.05, 3.0e4], ids=["tiny_queries", "small_queries", "large_queries"])
@pytest.mark.parametrize("splits", [1, 2], ids=["one_split", "two_splits"])
@pytest.mark.parametrize("d_c", [512, 384])
@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_with_fp16_mmas_for_16_bit_queries(poisoned, device, magnitude, splits, d_c, reload):
    """``fp8_mma="fp16"``: 16-bit latent queries enter fp16 MMAs scaled by a power of two into [2^7, 2^8) (so bf16
    queries past fp16's 65504, or below its normal range, lose nothing) and p * scale * 512 is rounded to fp16
    (2^-11 relative, finer than bf16's 2^-8), then divided out of the output. Against the fp64 attention over the
    same fp8 values, so only those roundings remain. bf16 queries on CUDA; fp16 under the interpreter (its bf16
    ``tl.dot`` is wrong, see below), where the largest queries stay inside fp16's range."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    lens = torch.tensor([150, 33], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 16, d_c, 64, 2, 150, device, seed=13)
    if dtype == torch.float16:
        magnitude = min(magnitude, 1.0e4)  # fp16 inputs themselves stop at 65504; bf16 ones on CUDA go past it
    q_latent = (q_latent * magnitude).to(dtype)
    q_pe = q_pe.to(dtype)
    scale = 0.1 / magnitude
    c8, c_scale, k_pe16 = fp8_rows(c_kv, k_pe)
    config = DecodeConfig(block_n=16, min_split_tokens=16, fp8_mma="fp16", fp8_reload=reload)
    out, lse = mla_decode(q_latent, q_pe, c8, k_pe16, lens, scale, c_kv_scale=c_scale, num_splits=splits, config=config)
    ref_out, ref_lse = mla_decode_reference(q_latent, q_pe, c8, k_pe16, lens, scale, c_kv_scale=c_scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = (out.double().cpu() - ref_out.cpu()).norm() / ref_out.cpu().norm()
    assert rel < 2.0**-7, rel  # the output's own rounding (bf16: 2^-9) plus fp16 probabilities, with margin
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), atol=2e-3, rtol=1e-3)


def test_fp8_bad_inputs_raise_before_launch(device):
    q_latent, q_pe, c_kv, k_pe = make_inputs(2, 4, 128, 16, 2, 16, device)
    c8, scale, k_pe16 = fp8_rows(c_kv, k_pe)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="needs its c_kv_scale"):
        mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.3)
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, lens, 0.3, c_kv_scale=scale)
    with pytest.raises(ValueError, match="c_kv_scale must be"):
        mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.3, c_kv_scale=scale[:, :8])
    with pytest.raises(ValueError, match="fp8_mma must be"):
        mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.3, c_kv_scale=scale, config=DecodeConfig(fp8_mma="e4m3"))
    with pytest.raises(ValueError, match="block_n must be >= 16"):
        mla_decode(q_latent, q_pe, c8, k_pe16, lens, 0.3, c_kv_scale=scale, config=DecodeConfig(block_n=8))
    wide = make_inputs(2, 4, 640, 16, 2, 16, device)
    wide8, wide_scale, wide_pe = fp8_rows(wide[2], wide[3])
    with pytest.raises(ValueError, match="at most 512 latent values"):
        mla_decode(wide[0], wide[1], wide8, wide_pe, lens, 0.3, c_kv_scale=wide_scale)


def test_fp8_decode_bytes_are_flashmla_rows():
    assert decode_bytes(1000, 0, 16, 512, 64, 2, fp8_cache=True) == 656 * 1000
    assert decode_bytes(1000, 0, 16, 512, 64, 2) == 1152 * 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("fp8_mma", ["bf16", "fp16"])
@pytest.mark.parametrize("reload", [False, True], ids=["one_load", "reload"])
def test_fp8_real_shapes_on_gpu(heads, fp8_mma, reload):
    """DeepSeek-V3 widths in FlashMLA's 656-byte rows, bf16 queries, ragged lengths up to 9k, auto splits."""
    device = torch.device("cuda")
    lens = torch.tensor([9001, 1, 4096, 777], dtype=torch.int32, device=device)
    q_latent, q_pe, c_kv, k_pe = make_inputs(4, heads, 512, 64, 4, 9024, device, dtype=torch.bfloat16, seed=7)
    c8, scale, k_pe16 = fp8_rows(c_kv, k_pe)
    config = default_config(heads, 4, num_sms(device), 9024, fp8=True)
    config = dataclasses.replace(config, fp8_mma=fp8_mma, fp8_reload=reload)
    out, lse = mla_decode(q_latent, q_pe, c8, k_pe16, lens, 192**-0.5, c_kv_scale=scale, config=config)
    ref_out, ref_lse = mla_decode_reference(q_latent, q_pe, c8, k_pe16, lens, 192**-0.5, c_kv_scale=scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
