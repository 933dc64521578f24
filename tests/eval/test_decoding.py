"""Chunked prefill + cached greedy decode gives Torchtune ``generate``'s tokens for MLA and GQA, at any chunk size."""

import pytest
import torch
from torchtune.modules.common_utils import local_kv_cache

from mla_components.decoding import chunked_prefill_greedy, greedy_generate
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
