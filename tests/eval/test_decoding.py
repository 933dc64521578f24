"""Chunked prefill + cached greedy decode gives Torchtune ``generate``'s tokens for MLA and GQA, at any chunk size."""

import pytest
import torch
from torchtune.modules.common_utils import local_kv_cache

from mla_components.decoding import CudaGraphStep, cached_greedy_decode, chunked_prefill_greedy, greedy_generate
from mla_components.models import gqa_tiny, mla_tiny


@pytest.mark.parametrize("builder", [mla_tiny, gqa_tiny], ids=["mla_tiny", "gqa_tiny"])
def test_chunked_prefill_matches_one_shot_generation(builder):
    torch.manual_seed(0)
    model = builder(max_seq_len=1024).eval()
    with torch.no_grad():
        for param in model.parameters():  # larger than the default init, so greedy paths differ between prompts
            param.normal_(0.0, 0.1)
    prompt = torch.randint(0, 256, (300,))
    expected = greedy_generate(model, prompt, max_new_tokens=10)[0][0, 300:].tolist()
    with local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=320):
        for chunk in (512, 128, 37):  # one pass, even chunks, a ragged last chunk
            assert chunked_prefill_greedy(model, prompt, 10, prefill_chunk=chunk) == expected
        # a stop token ends generation before it is emitted
        assert (
            chunked_prefill_greedy(model, prompt, 10, prefill_chunk=64, stop_tokens=[expected[3]])
            == expected[: expected.index(expected[3])]
        )


def test_cache_must_fit_prompt_and_new_tokens():
    model = mla_tiny(max_seq_len=256).eval()
    with pytest.raises(ValueError, match="set up the model's KV caches"):
        chunked_prefill_greedy(model, [1, 2, 3], 4)
    with (
        local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=8),
        pytest.raises(ValueError, match="exceed the KV cache"),
    ):
        chunked_prefill_greedy(model, list(range(6)), 4)


@torch.no_grad()
def test_mla_prefill_chunk_with_causal_bias_equals_the_boolean_cache_mask():
    """A prefill chunk of an MLA model may take SDPA's lower-right CausalBias (what chunked prefill passes, so the
    fused kernels run) instead of the boolean mask over the whole cache: the same logits, and a bias that does not
    describe this chunk is refused."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    from mla_components.modules.kv_cache import causal_cache_mask

    torch.manual_seed(0)
    model = mla_tiny(max_seq_len=512).eval()
    for param in model.parameters():
        param.normal_(0.0, 0.1)
    tokens = torch.randint(0, 256, (1, 160))
    outputs = []
    for use_bias in (False, True):
        with local_kv_cache(
            model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=256
        ):
            for start in (0, 96):  # a first chunk and one that also attends to a cached prefix
                chunk, positions = tokens[:, start : start + 96], torch.arange(start, min(start + 96, 160))[None]
                n = chunk.shape[1]
                mask = causal_lower_right(n, start + n) if use_bias else causal_cache_mask(start, n, 256, tokens.device)
                outputs.append(model(chunk, mask=mask, input_pos=positions))
    for boolean, bias in zip(outputs[:2], outputs[2:], strict=True):
        torch.testing.assert_close(bias, boolean, rtol=1e-5, atol=1e-5)
    with local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=256):
        model(tokens[:, :96], mask=causal_lower_right(96, 96), input_pos=torch.arange(96)[None])
        with pytest.raises(ValueError, match=r"must be causal_lower_right\(64, 160\)"):
            model(tokens[:, 96:], mask=causal_upper_left(64, 160), input_pos=torch.arange(96, 160)[None])


@torch.no_grad()
def test_an_mla_decode_step_given_its_mask_reads_no_fill_level(monkeypatch):
    """The cache's fill level is a host sync (``.item()``): a decode step that is given its boolean mask never reads
    it, so the step can be captured in a CUDA graph and costs no device round trip."""
    from mla_components.modules import MLAKVCache
    from mla_components.modules.kv_cache import causal_cache_mask

    model = mla_tiny(max_seq_len=128).eval()
    tokens = torch.randint(0, 256, (1, 17))
    with local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=64):
        model(tokens[:, :16], mask=causal_cache_mask(0, 16, 64, tokens.device), input_pos=torch.arange(16)[None])
        monkeypatch.setattr(MLAKVCache, "size", property(lambda self: pytest.fail("decode step read the fill level")))
        logits = model(tokens[:, 16:], mask=causal_cache_mask(16, 1, 64, tokens.device), input_pos=torch.tensor([[16]]))
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()


def test_kv_cache_without_host_check_updates_like_torchtune_and_restores_it():
    """The capture-time stand-in for Torchtune's ``KVCache.update`` writes and advances the cache exactly as upstream
    does (without its host-side assertion), and upstream is back after the block, even after an error."""
    from torchtune.modules.kv_cache import KVCache

    from mla_components.compat.torchtune import kv_cache_without_host_check

    upstream = KVCache.update
    torch.manual_seed(0)
    caches = [KVCache(2, 16, num_kv_heads=2, head_dim=4, dtype=torch.float32) for _ in range(2)]
    steps = [(torch.randn(2, 2, n, 4), torch.randn(2, 2, n, 4)) for n in (5, 1, 3)]
    for k, v in steps:
        caches[0].update(k, v)
    with kv_cache_without_host_check():
        assert KVCache.update is not upstream
        for k, v in steps:
            caches[1].update(k, v)
        with pytest.raises(ValueError, match="batch size"):  # upstream's own check still runs
            caches[1].update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    assert KVCache.update is upstream
    for name in ("k_cache", "v_cache", "cache_pos"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), rtol=0, atol=0)
    with pytest.raises(RuntimeError), kv_cache_without_host_check():
        raise RuntimeError
    assert KVCache.update is upstream


def test_next_token_hook_decodes_torchtune_generate_recipe_through_the_given_step():
    """Inside the hook, Torchtune's ``generate`` recipe's call to ``generation.generate`` (no custom step) decodes
    through the step made for its model: every token after the prefill's, the same tokens as without the hook. A call
    that brings its own step keeps it, and the recipe module's ``generation`` is back after the block."""
    from torchtune import generation

    from mla_components.compat.torchtune import next_token_hook, upstream_recipe

    recipe = upstream_recipe("generate.py")
    assert recipe.generation is generation and hasattr(recipe, "InferenceRecipe")
    torch.manual_seed(0)
    model = mla_tiny(max_seq_len=64).eval()
    prompt = torch.randint(0, 256, (1, 12))
    calls, made_for = [], []

    def make_step(m):
        made_for.append(m)

        def step(*args, **kwargs):
            calls.append(kwargs["x"].shape)  # [b, 1]: one token per decode step
            return generation.generate_next_token(*args, **kwargs)

        return step

    def run(**kwargs):
        with local_kv_cache(
            model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=20
        ):
            return recipe.generation.generate(model=model, prompt=prompt, max_generated_tokens=6, top_k=1, **kwargs)[0]

    expected = run(custom_generate_next_token=None)
    with next_token_hook(recipe, make_step):
        assert recipe.generation is not generation
        hooked = run(custom_generate_next_token=None)
        assert made_for == [model] and calls == [torch.Size([1, 1])] * 5
        own = run(custom_generate_next_token=generation.generate_next_token)
        assert len(made_for) == 1  # a call's own step is kept
    assert recipe.generation is generation
    assert torch.equal(hooked, expected) and torch.equal(own, expected)


def test_cuda_graph_step_is_the_plain_forward_off_cuda():
    model = mla_tiny(max_seq_len=64).eval()
    assert not CudaGraphStep(model, enabled=True).enabled and not CudaGraphStep(model).enabled
    overflow = r"position \(10\) \+ max_new_tokens \(8\) exceed the KV cache \(16\)"
    with (
        local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=16),
        pytest.raises(ValueError, match=overflow),
    ):
        cached_greedy_decode(model, 1, 10, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("builder", [mla_tiny, gqa_tiny], ids=["mla_tiny", "gqa_tiny"])
def test_cuda_graph_decode_equals_eager_decode_on_gpu(builder):
    """Replayed decode steps give the eager steps' tokens (chunked prefill + greedy, over several prompts through
    one cache allocation) and logits (Torchtune's generate, batched with left padding); MLA decodes through the
    Triton kernel."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = builder(max_seq_len=1024).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    prompts = [torch.randint(0, 256, (n,), device="cuda") for n in (300, 200)]
    for cuda_graph in (False, True):
        with local_kv_cache(
            model, batch_size=1, device=torch.device("cuda"), dtype=torch.float32, decoder_max_seq_len=320
        ):
            step = CudaGraphStep(model, cuda_graph)  # one capture for both prompts, as the passkey evaluation does
            got = [chunked_prefill_greedy(model, p, 16, prefill_chunk=128, step=step) for p in prompts]
            assert step.enabled == cuda_graph
        if not cuda_graph:
            expected = got
    assert got == expected and all(len(ids) == 16 for ids in got)

    batch = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    batch[0], batch[1, 100:] = prompts[0], prompts[1]  # left padding with pad_id 0
    eager_tokens, eager_logits = greedy_generate(model, batch, 12, cuda_graph=False)
    graph_tokens, graph_logits = greedy_generate(model, batch, 12, cuda_graph=True)
    assert torch.equal(graph_tokens, eager_tokens)
    torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_flash_value_padding_only_where_flash_can_take_the_call():
    """The value is widened to the query/key width only for CUDA inference in half precision with a CausalBias or no
    mask and a square call (what the flash kernel accepts); anything else runs as given."""
    from torch.nn.attention.bias import causal_lower_right

    from mla_components.modules.attention import flash_value_padding

    q = torch.empty(1, 3, 8, 128, dtype=torch.bfloat16)  # [b, n_h, s_x, d_qk]
    with torch.no_grad():
        assert flash_value_padding(q, 8, 64, None, 0.0) == 0  # the CPU: SDPA has no flash kernel to reach
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return
    q = q.cuda()
    with torch.no_grad():
        assert flash_value_padding(q, 16, 64, causal_lower_right(8, 16), 0.0) == 64
        assert flash_value_padding(q, 8, 64, None, 0.0) == 64
        assert flash_value_padding(q, 16, 64, None, 0.0) == 0  # non-square without a bias
        assert flash_value_padding(q, 8, 64, torch.ones(8, 8, dtype=torch.bool, device="cuda"), 0.0) == 0
        assert flash_value_padding(q, 8, 64, None, 0.1) == 0
        assert flash_value_padding(q.float(), 8, 64, None, 0.0) == 0
        assert flash_value_padding(q, 8, 128, None, 0.0) == 0
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
            assert flash_value_padding(q, 8, 64, None, 0.0) == 0  # flash turned off
    assert flash_value_padding(q, 8, 64, None, 0.0) == 0  # under autograd


def _prefill_two_chunks(model, prompt, device, dtype):
    """Logits of a 128-token prompt prefilled into the cache in two chunks, the second attending to the first."""
    from torch.nn.attention.bias import causal_lower_right

    with local_kv_cache(model, batch_size=1, device=device, dtype=dtype, decoder_max_seq_len=256):
        chunks = [
            model(prompt[:, s : s + 64], mask=causal_lower_right(64, s + 64), input_pos=torch.arange(s, s + 64)[None])
            for s in (0, 64)
        ]
    return torch.cat(chunks, 1)


def _random_mla(kind: str, device: str, dtype: torch.dtype):
    from mla_components.models import mla
    from tests.model.conftest import small_config

    torch.manual_seed(0)
    # mla_tiny: d_n 64, d_r 64, d_v 64 (the value padded by 64); small_config: distinct widths 12, 8, 10 (by 10)
    model = mla_tiny(max_seq_len=512) if kind == "mla_tiny" else mla(small_config(vocab_size=256))
    for param in model.parameters():
        param.normal_(0.0, 0.1)
    return model.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("kind", ["mla_tiny", "distinct_dims"])
@torch.no_grad()
def test_chunked_prefill_with_the_value_widened_gives_the_same_logits(monkeypatch, kind):
    """Keys and zero-padded values projected straight from the latent (what flash gets on CUDA) leave every logit
    of a chunked prefill unchanged. Forced here on the CPU."""
    from mla_components.modules import attention

    model = _random_mla(kind, "cpu", torch.float32)
    prompt = torch.randint(0, 256, (1, 128))
    expected = _prefill_two_chunks(model, prompt, torch.device("cpu"), torch.float32)
    widened = []
    monkeypatch.setattr(attention, "flash_value_padding", lambda q, kv_len, v_dim, *a: widened.append(1) or 1)
    got = _prefill_two_chunks(model, prompt, torch.device("cpu"), torch.float32)
    assert widened
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (SDPA's flash kernel)")
@pytest.mark.parametrize("kind", ["mla_tiny", "distinct_dims"])
@torch.inference_mode()
def test_chunked_prefill_on_flash_matches_the_unwidened_call_on_gpu(monkeypatch, kind):
    """bf16 on the GPU: the chunked prefill with the widened value (flash) against the same model with the widening
    turned off (the memory-efficient kernel), within bf16 rounding of the logits."""
    from mla_components.modules import attention

    model = _random_mla(kind, "cuda", torch.bfloat16)
    prompt = torch.randint(0, 256, (1, 128), device="cuda")
    widened = _prefill_two_chunks(model, prompt, torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(attention, "flash_value_padding", lambda *a: 0)
    plain = _prefill_two_chunks(model, prompt, torch.device("cuda"), torch.bfloat16)
    torch.testing.assert_close(widened.float(), plain.float(), rtol=2e-2, atol=2e-2)
