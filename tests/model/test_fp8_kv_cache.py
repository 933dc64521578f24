"""The FP8 latent KV cache (``kv_cache_dtype="fp8_e4m3"``): its 656-byte rows, its accuracy cost, its errors.

Tolerance, from e4m3's precision: 3 mantissa bits, so a step of 2^-3 relative to the value's power of two, and
round-to-nearest leaves at most half of it, ``|error| <= 2^-4 |x|`` per latent value (RMS ~2^-5.3 over a binade;
the per-group scale maps each group's largest value to 448 exactly, so nothing saturates; values below 2^-6 of
a group's scale fall into e4m3's subnormals, absolute error <= 2^-10 of the scale). The error reaches the logits
linearly (to first order): the scores ``q . c`` and the values ``W_UV c`` are linear in the latent, so each
carries a relative error of the same order (independent round-offs average over the 512 latent values and over
the attended tokens instead of adding up), and the layers then scale it by their gain. Hence two checks:

- with the builder's own random initialisation (layer gains below 1) the error cannot grow past a single value's
  worst case: ``|logits_fp8 - logits| / |logits| <= 2^-4`` (measured: 0.58% fp32; 0.87% bf16, where the
  unquantised cache already differs by 0.36% from bf16 rounding; top-1 tokens all equal);
- with weights whose layers amplify (``randomize_``: N(0, 0.1), gains above 1), the bound is the model's own
  response to the worst case: the fp8 logit error must not exceed that of perturbing every cached latent value by
  ``+-2^-4`` of itself, and must exceed that of ``+-2^-6`` (it is a real 3-bit rounding, not a no-op); measured
  14.5% between 8.6% and 32%.
"""

import pytest
import torch

from mla_components.kv_cache_report import allocated_kv_cache_bytes, kv_cache_bytes_per_token
from mla_components.models import MLAConfig, mla, mla_1b, mla_tiny
from mla_components.models._model_builders import MLA_1B
from mla_components.modules import MLAKVCache, backend
from tests._requirements import unavailable

from .conftest import randomize_, small_config

E4M3_HALF_STEP = 2.0**-4


def _model(kv_cache_dtype, dtype=torch.float32, init="builder", kernel_backend="torch"):
    torch.manual_seed(0)
    model = mla_tiny(max_seq_len=128, kernel_backend=kernel_backend, kv_cache_dtype=kv_cache_dtype)
    if init == "randomize":
        randomize_(model)
    return model.eval().to(dtype)


def _uncached_and_cached_logits(model, dtype, length=48, prefill=16):
    """Logits ``[2, length, vocab]`` of one uncached forward and of a cached run (a ``prefill``-token chunk, then
    one token per step through the absorbed decode path)."""
    tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(1))
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    with torch.no_grad():
        uncached = model(tokens)
        model.setup_caches(batch_size=2, dtype=dtype, decoder_max_seq_len=length)
        chunks = [
            model(
                tokens[:, :prefill],
                mask=causal[None, :prefill].expand(2, -1, -1),
                input_pos=torch.arange(prefill).expand(2, -1),
            )
        ]
        for pos in range(prefill, length):
            chunks.append(
                model(
                    tokens[:, pos : pos + 1],
                    mask=causal[None, pos : pos + 1].expand(2, -1, -1),
                    input_pos=torch.full((2, 1), pos),
                )
            )
    return uncached.float(), torch.cat(chunks, dim=1).float()


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_cached_decode_logits_vs_bf16_cache_and_uncached_forward(dtype):
    uncached, unquantised = _uncached_and_cached_logits(_model("bf16", dtype), dtype)
    uncached_fp8, fp8 = _uncached_and_cached_logits(_model("fp8_e4m3", dtype), dtype)
    assert torch.equal(uncached_fp8, uncached), "the cache dtype must not change the uncached (training) path"
    floor = _rel(unquantised, uncached)  # the unquantised cache: rounding of the compute dtype only
    assert floor < (1e-5 if dtype == torch.float32 else 2.0**-6)
    err = _rel(fp8, uncached)
    assert err <= E4M3_HALF_STEP, f"fp8 cache: relative logit error {err:.4f} > 2^-4"
    # in fp32 the unquantised floor is ~1e-7; bf16 compute's own rounding is within a few x of the fp8 cost
    assert err > (5 * floor if dtype == torch.float32 else floor), "the fp8 cache changed nothing: not quantised?"
    assert _rel(fp8, unquantised) <= E4M3_HALF_STEP


def test_fp8_error_is_bounded_by_the_models_response_to_worst_case_e4m3_round_off(monkeypatch):
    """Amplifying random weights: fp8 error <= error of +-2^-4 on every cached latent value, > that of +-2^-6."""
    uncached, fp8 = _uncached_and_cached_logits(_model("fp8_e4m3", init="randomize"), torch.float32)
    update = MLAKVCache.update

    def perturbed_error(eps):
        gen = torch.Generator().manual_seed(5)

        def perturb(self, c_kv, k_pe):
            sign = torch.randint(0, 2, c_kv.shape, generator=gen).to(c_kv.dtype) * 2 - 1
            return update(self, c_kv * (1 + eps * sign), k_pe)

        monkeypatch.setattr(MLAKVCache, "update", perturb)
        _, logits = _uncached_and_cached_logits(_model("bf16", init="randomize"), torch.float32)
        monkeypatch.setattr(MLAKVCache, "update", update)
        return _rel(logits, uncached)

    err = _rel(fp8, uncached)
    assert perturbed_error(2.0**-6) < err <= perturbed_error(E4M3_HALF_STEP)


def test_fp8_cache_through_the_triton_kernel_matches_the_torch_dequantisation(monkeypatch):
    """The kernel dequantises in its loads, the torch path before its product (fp32 compute; the interpreter cannot
    run bf16 ``tl.dot``, see tests/kernels). Unquantised, the two backends agree to ~1e-7; here the fp32 round-off
    between them (~1e-7) moves a few later layers' latents across an e4m3 rounding boundary (measured: 35 of
    4 x 24,576 codes), each a full 2^-3 step, so the logits agree to ~1e-4 relative: far below the fp8 cost itself
    (~6e-3, the test above), and a wrong dequantisation would be off by O(1)."""
    if not backend.triton_available():
        unavailable('triton is not installed (pip install -e ".[triton]"; the interpreter runs it on CPU)')
    from mla_kernels import mla_decode as mla_decode_module

    calls = []
    real = mla_decode_module.mla_decode
    monkeypatch.setattr(mla_decode_module, "mla_decode", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, torch_logits = _uncached_and_cached_logits(_model("fp8_e4m3"), torch.float32, length=24, prefill=16)
    _, triton_logits = _uncached_and_cached_logits(
        _model("fp8_e4m3", kernel_backend="triton"), torch.float32, length=24, prefill=16
    )
    assert len(calls) == 8 * 4 and all(k["c_kv_scale"] is not None for k in calls)
    assert _rel(triton_logits, torch_logits) < 5e-4


def test_fp8_rows_are_flashmlas_656_bytes_and_hold_what_was_written():
    cache = MLAKVCache(2, 10, 512, 64, torch.float32, kv_cache_dtype="fp8_e4m3")
    assert cache.cache.dtype == torch.uint8 and cache.cache.shape == (2, 10, 656)
    assert cache.c_kv.dtype == torch.float8_e4m3fn and cache.c_kv.shape == (2, 10, 512)
    assert cache.c_kv_scale.dtype == torch.float32 and cache.c_kv_scale.shape == (2, 10, 4)
    assert cache.k_pe.dtype == torch.bfloat16 and cache.k_pe.shape == (2, 10, 64)
    gen = torch.Generator().manual_seed(0)
    c_kv, k_pe = torch.randn(2, 3, 512, generator=gen), torch.randn(2, 3, 64, generator=gen)
    cache.update(c_kv, k_pe)
    assert cache.size == 3
    got_c, got_r = cache.dequantized(2, 3)
    assert got_c.dtype == got_r.dtype == torch.float32
    assert ((got_c - c_kv).abs() <= E4M3_HALF_STEP * c_kv.abs() + 1e-6).all()
    assert torch.equal(got_r, k_pe.bfloat16().float())
    assert torch.equal(cache.c_kv_scale[:, :3], c_kv.unflatten(-1, (4, 128)).abs().amax(-1) / 448)
    assert cache.cache[:, 3:].abs().sum() == 0
    cache.reset()
    assert cache.size == 0 and cache.cache.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_allocated_cache_bytes_equal_the_formula_whatever_the_model_dtype(dtype):
    config = small_config(num_layers=3, kv_lora_rank=256, kv_cache_dtype="fp8_e4m3")
    model = mla(config)
    batch, max_seq = 2, 37
    model.setup_caches(batch_size=batch, dtype=dtype, decoder_max_seq_len=max_seq)
    row = 256 + 4 * 2 + 2 * 8  # e4m3 latent, 2 fp32 scales, bf16 rope key
    assert config.kv_cache_bytes_per_token_layer() == row
    assert allocated_kv_cache_bytes(model) == config.num_layers * row * batch * max_seq


def test_mla_1b_fp8_cache_measures_16_x_656_bytes_per_token():
    """Measured from the cache tensors allocated at two lengths (meta-device model), against the formula."""

    def mla_1b_fp8():
        return mla_1b(kv_cache_dtype="fp8_e4m3")

    measured = kv_cache_bytes_per_token(mla_1b_fp8)
    assert measured == 16 * 656 == 10_496
    assert measured == MLA_1B.num_layers * MLA_1B.replace(kv_cache_dtype="fp8_e4m3").kv_cache_bytes_per_token_layer()
    assert kv_cache_bytes_per_token(mla_1b) == 16 * 1152 == MLA_1B.num_layers * MLA_1B.kv_cache_bytes_per_token_layer()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype"),
        ({"kv_cache_dtype": "bfloat16"}, "kv_cache_dtype"),
        ({"kv_cache_dtype": "fp8_e4m3", "kv_lora_rank": 40}, "kv_lora_rank"),
        ({"kv_cache_dtype": "fp8_e4m3", "kv_lora_rank": 192}, "multiple of 128"),
    ],
)
def test_bad_cache_dtype_combinations_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_bad_cache_dtypes_are_refused_by_builders_and_modules_too():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        mla_tiny(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_tiny(kv_cache_dtype="fp8_e4m3", kv_lora_rank=320)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAKVCache(1, 4, 40, 8, torch.float32, kv_cache_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        MLAKVCache(1, 4, 128, 8, torch.float32, kv_cache_dtype="e4m3")
    # a float8 setup_caches dtype would put the rope key (and unscaled latents) in fp8
    model = mla_tiny(kv_cache_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="rope key"):
        model.setup_caches(batch_size=1, dtype=torch.float8_e4m3fn, decoder_max_seq_len=8)
    with pytest.raises(ValueError, match="rope key"):
        mla_tiny().setup_caches(batch_size=1, dtype=torch.float8_e5m2, decoder_max_seq_len=8)


def test_cache_dtype_is_not_part_of_the_hf_config():
    """A serving-time choice: the exported config.json is the same for both (vLLM takes --kv-cache-dtype)."""
    config = MLA_1B.replace(kv_cache_dtype="fp8_e4m3")
    assert config.to_hf_config() == MLA_1B.to_hf_config()
    assert MLAConfig.from_hf_config(config.to_hf_config(), kv_cache_dtype="fp8_e4m3") == config
