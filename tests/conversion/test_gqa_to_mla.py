"""The GQA -> MLA conversion math against transformers' own Llama and DeepseekV3 (tiny random models, CPU).

The conversion is exact wherever the method loses nothing: keys whose KV heads are collinear at every kept RoPE
frequency (RoRoPE puts all of it into the shared ``k_pe``), nothing at the frequencies the MLA rope drops, a latent
as wide as the position-free keys plus values, and DeepSeek's latent RMSNorm taken out (it is the one nonlinear
step MLA adds). Each test also shows that the comparison fails when one of those conditions is broken.
"""

import math

import pytest
import torch

from mla_components.conversion.gqa_to_mla import (
    LayerCalibration,
    OriginShape,
    check_conversion_args,
    convert_llama_to_mla,
    mla_config_for,
    rope_frequency_map,
)
from mla_components.models import SMOLLM2_135M_CONFIG, SMOLLM2_135M_MLA
from tests._requirements import require_module

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 4, 2, 16, 2


@pytest.fixture(scope="module")
def transformers():
    require_module("transformers", "the reference implementation (pip install -e '.[dev]')")
    import transformers

    return transformers


def tiny_llama(transformers, seed: int = 0, collinear_at: list[int] | None = None, zero_other_freqs: bool = False):
    """A random Llama whose KV heads' keys are collinear at the frequencies ``collinear_at`` (pair ``i`` is rows
    ``i`` and ``i + HEAD_DIM/2`` of each head); with ``zero_other_freqs`` the keys at other frequencies are zero."""
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    half = HEAD_DIM // 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 + 0.2 * torch.randn(p.shape, generator=gen))
                if "norm" in name
                else 0.1 * torch.randn(p.shape, generator=gen)
            )
        for layer in model.model.layers:
            k = layer.self_attn.k_proj.weight.view(KV_HEADS, HEAD_DIM, HIDDEN)
            for i in range(half):
                rows = [i, i + half]
                if collinear_at is not None and i in collinear_at:
                    for h in range(1, KV_HEADS):
                        k[h, rows] = (0.5 + h) * k[0, rows]
                elif zero_other_freqs:
                    k[:, rows] = 0.0
    return model


def calibration(origin, seed: int = 0) -> list[LayerCalibration]:
    """Second moments and samples of each layer's attention input on random tokens (not the test's tokens)."""
    inputs = [[] for _ in range(LAYERS)]
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: inputs[i].append(out.reshape(-1, HIDDEN)))
        for i, layer in enumerate(origin.model.layers)
    ]
    with torch.no_grad():
        origin(torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(seed)))
    for hook in hooks:
        hook.remove()
    samples = [torch.cat(x) for x in inputs]
    return [LayerCalibration(x.double().T @ x.double() / len(x), x) for x in samples]


def converted(transformers, origin, *, rank: int, rope: int, keep_norm: bool = False, stabilizer: int = 0):
    result = convert_llama_to_mla(
        origin.config.to_dict(),
        origin.state_dict(),
        calibration(origin),
        kv_lora_rank=rank,
        qk_rope_head_dim=rope,
        stabilizer_dims=stabilizer,
    )
    mla = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**result.config.to_hf_config())).eval()
    missing, unexpected = mla.load_state_dict(result.hf_state_dict, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    if not keep_norm:
        for layer in mla.model.layers:
            layer.self_attn.kv_a_layernorm = torch.nn.Identity()
    return mla, result


def relative_error(model, reference, tokens) -> float:
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference(tokens).logits
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


TOKENS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))


def test_full_rope_and_full_latent_are_exact_when_kv_heads_share_their_rotary_direction(transformers):
    origin = tiny_llama(transformers, collinear_at=list(range(HEAD_DIM // 2)))
    full_width = 2 * KV_HEADS * HEAD_DIM - HEAD_DIM
    mla, result = converted(transformers, origin, rank=full_width, rope=HEAD_DIM)
    assert result.summary()["mean_rope_key_energy"] == pytest.approx(1.0)
    assert result.summary()["mean_latent_energy"] == 1.0
    assert relative_error(mla, origin, TOKENS) < 1e-5
    # zero padding beyond the keys' and values' width changes nothing
    padded, _ = converted(transformers, origin, rank=full_width + 16, rope=HEAD_DIM)
    assert relative_error(padded, origin, TOKENS) < 1e-5


def test_keys_that_disagree_across_heads_lose_rotation_and_the_logits_move(transformers):
    origin = tiny_llama(transformers)  # independent heads: the non-principal directions lose RoPE
    mla, result = converted(transformers, origin, rank=2 * KV_HEADS * HEAD_DIM - HEAD_DIM, rope=HEAD_DIM)
    assert result.summary()["mean_rope_key_energy"] < 0.95
    assert relative_error(mla, origin, TOKENS) > 1e-3


def test_a_rope_dim_dividing_the_head_dim_keeps_the_origin_frequencies_exactly(transformers):
    rope = HEAD_DIM // 2
    picked, exact = rope_frequency_map(HEAD_DIM, rope)
    assert exact and picked == [0, 2, 4, 6]
    origin = tiny_llama(transformers, collinear_at=picked, zero_other_freqs=True)
    mla, _ = converted(transformers, origin, rank=2 * KV_HEADS * HEAD_DIM - rope, rope=rope)
    assert relative_error(mla, origin, TOKENS) < 1e-5
    # keys at the frequencies the MLA rope drops lose their rotation
    rotating = tiny_llama(transformers, collinear_at=list(range(HEAD_DIM // 2)))
    mla, _ = converted(transformers, rotating, rank=2 * KV_HEADS * HEAD_DIM - rope, rope=rope)
    assert relative_error(mla, rotating, TOKENS) > 1e-3


def test_norm_stabilisers_make_the_latent_rmsnorm_nearly_linear(transformers):
    origin = tiny_llama(transformers, collinear_at=list(range(HEAD_DIM // 2)))
    full_width = 2 * KV_HEADS * HEAD_DIM - HEAD_DIM
    plain, plain_result = converted(transformers, origin, rank=full_width + 16, rope=HEAD_DIM, keep_norm=True)
    stable, stable_result = converted(
        transformers, origin, rank=full_width + 16, rope=HEAD_DIM, keep_norm=True, stabilizer=16
    )
    plain_error, stable_error = relative_error(plain, origin, TOKENS), relative_error(stable, origin, TOKENS)
    assert plain_result.summary()["mean_latent_rms_cv"] > 0.05
    assert stable_result.summary()["mean_latent_rms_cv"] < 0.02
    assert stable_error < plain_error / 2, (stable_error, plain_error)


def test_a_narrower_latent_loses_more(transformers):
    origin = tiny_llama(transformers, collinear_at=list(range(HEAD_DIM // 2)))
    full_width = 2 * KV_HEADS * HEAD_DIM - HEAD_DIM
    errors = []
    for rank in (8, 24, full_width):
        mla, result = converted(transformers, origin, rank=rank, rope=HEAD_DIM)
        errors.append(relative_error(mla, origin, TOKENS))
        assert result.summary()["mean_latent_energy"] <= 1.0
    assert errors[0] > errors[1] > errors[2]


def test_rope_frequency_map():
    assert rope_frequency_map(64, 64) == (list(range(32)), True)
    assert rope_frequency_map(64, 16) == ([0, 4, 8, 12, 16, 20, 24, 28], True)
    picked, exact = rope_frequency_map(64, 48)
    assert not exact and len(picked) == 24 and picked == sorted(set(picked))


@pytest.mark.parametrize(
    ("rank", "rope", "field"),
    [(256, 63, "qk_rope_head_dim"), (256, 128, "qk_rope_head_dim"), (1, 64, "kv_lora_rank"), (0, 64, "kv_lora_rank")],
)
def test_ranks_the_method_cannot_produce_are_refused_by_name(rank, rope, field):
    shape = OriginShape(hidden=576, n_q=9, n_kv=3, head_dim=64, rope_theta=1e5)
    with pytest.raises(ValueError, match=field):
        check_conversion_args(shape, rank, rope)


def test_the_converted_model_is_the_shipped_builder():
    for rank in (256, 512):
        assert mla_config_for(SMOLLM2_135M_CONFIG, rank, 64) == SMOLLM2_135M_MLA.replace(kv_lora_rank=rank)
    assert math.isclose(SMOLLM2_135M_MLA.replace(kv_lora_rank=256).kv_cache_width * 30 * 2, 19_200)


def test_the_weights_do_not_depend_on_the_signs_lapack_returns(transformers, monkeypatch):
    """A rerun on another machine must rebuild the same base (a compact delta checks its base): LAPACK builds may
    return any eigen/singular vector negated, so the conversion fixes each vector's sign itself. Here every other
    pair of vectors comes back negated."""
    origin = tiny_llama(transformers)
    kwargs = dict(kv_lora_rank=20, qk_rope_head_dim=8, stabilizer_dims=4)  # PCA latent, RoRoPE mix, stabilisers
    layers = calibration(origin)
    reference = convert_llama_to_mla(origin.config.to_dict(), origin.state_dict(), layers, **kwargs).hf_state_dict
    eigh, svd = torch.linalg.eigh, torch.linalg.svd

    def signs(n: int) -> torch.Tensor:  # some vectors negated, others not
        return torch.tensor([(-1.0) ** (i // 2) for i in range(n)], dtype=torch.float64)

    def negated_eigh(matrix):
        values, vectors = eigh(matrix)
        return values, vectors * signs(vectors.shape[1]).to(vectors.dtype)  # eigenvectors are the columns

    def negated_svd(matrix, full_matrices=True):
        u, s, vh = svd(matrix, full_matrices=full_matrices)
        return u, s, vh * signs(vh.shape[0]).to(vh.dtype)[:, None]  # right singular vectors are the rows

    monkeypatch.setattr(torch.linalg, "eigh", negated_eigh)
    monkeypatch.setattr(torch.linalg, "svd", negated_svd)
    flipped = convert_llama_to_mla(origin.config.to_dict(), origin.state_dict(), layers, **kwargs).hf_state_dict
    assert flipped.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(flipped[name], tensor, rtol=1e-9, atol=1e-9, msg=name)
