"""The latent KV cache: absorbed cached decoding == uncached expanded forward, and its exact size."""

from pathlib import Path

import pytest
import torch
from torchtune.generation import generate
from torchtune.modules.common_utils import local_kv_cache

from mla_components.decoding import greedy_generate
from mla_components.kv_cache_report import allocated_kv_cache_bytes, kv_cache_bytes_per_token, kv_cache_table
from mla_components.models import gqa_1b, mla, mla_1b, mla_tiny
from mla_components.modules import MLAKVCache

from .conftest import YARN, randomize_, small_config


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q_lora", "q_full"])
@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_token_by_token_cached_logits_equal_one_uncached_forward(q_lora_rank, rope_scaling):
    torch.manual_seed(0)
    model = randomize_(mla(small_config(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling))).eval()
    tokens = torch.randint(0, 97, (2, 90))
    with torch.no_grad():
        expected = model(tokens)  # expanded path, no cache
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=100)
        causal = torch.tril(torch.ones(100, 100, dtype=torch.bool))
        prefill = 20  # a multi-token prefill into the cache, then one token at a time
        chunks = [
            model(
                tokens[:, :prefill],
                mask=causal[None, :prefill].expand(2, -1, -1),
                input_pos=torch.arange(prefill).expand(2, -1),
            )
        ]
        for pos in range(prefill, tokens.shape[1]):
            chunks.append(
                model(
                    tokens[:, pos : pos + 1],
                    mask=causal[None, pos : pos + 1].expand(2, -1, -1),
                    input_pos=torch.full((2, 1), pos),
                )
            )
    got = torch.cat(chunks, dim=1)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_cached_decode_never_expands_per_head_kv(monkeypatch):
    """Decode steps must not call kv_b_proj (the K/V decompression), only read its weight; the prefill of the
    8-token prompt expands once per layer."""
    model = randomize_(mla(small_config())).eval()
    calls = []
    for layer in model.layers:
        layer.attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)))
        assert calls, "the uncached (training) path expands through kv_b_proj"
        calls.clear()
        greedy_generate(model, torch.randint(1, 97, (8,)), max_new_tokens=4)
    assert len(calls) == len(model.layers)  # the prefill only; none in the 3 decode steps


def test_torchtune_generate_greedy_matches_uncached_argmax():
    torch.manual_seed(0)
    model = randomize_(mla(small_config(rope_scaling=YARN)), seed=3).eval()
    prompt = torch.randint(1, 97, (1, 12))  # 0 is the pad id
    tokens, logits = greedy_generate(model, prompt, max_new_tokens=10)
    # the same continuation, recomputed without any cache: argmax at each step
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, seq)
    with torch.no_grad():
        uncached = model(tokens[:, :-1])[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(logits, uncached, rtol=1e-5, atol=1e-5)


def test_batched_generation_with_left_padding_matches_single_sequences():
    """Torchtune pads left and passes padding-aware masks and positions; the latent cache must honour them."""
    model = randomize_(mla(small_config()), seed=5).eval()
    short, long = torch.randint(1, 97, (6,)), torch.randint(1, 97, (11,))
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    with (
        local_kv_cache(
            model, batch_size=2, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=11 + 6
        ),
        torch.no_grad(),
    ):
        tokens, _ = generate(model, batch, max_generated_tokens=6, pad_id=0, top_k=1)
    alone_short, _ = greedy_generate(model, short, 6)
    alone_long, _ = greedy_generate(model, long, 6)
    assert torch.equal(tokens[0, 5:], alone_short[0])
    assert torch.equal(tokens[1], alone_long[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_allocated_cache_bytes_formula(dtype):
    config = small_config(num_layers=3)
    model = mla(config)
    batch, max_seq = 2, 37
    model.setup_caches(batch_size=batch, dtype=dtype, decoder_max_seq_len=max_seq)
    expected = config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize * batch * max_seq
    assert allocated_kv_cache_bytes(model) == expected
    caches = [m for m in model.modules() if isinstance(m, MLAKVCache)]
    assert len(caches) == config.num_layers
    assert all(c.c_kv.shape == (batch, max_seq, 40) and c.k_pe.shape == (batch, max_seq, 8) for c in caches)


def test_cache_reset_and_size():
    model = mla(small_config())
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=16)
    cache = model.layers[0].attn.kv_cache
    with torch.no_grad():
        model(
            torch.randint(0, 97, (1, 5)),
            mask=torch.ones(1, 5, 16, dtype=torch.bool).tril(),
            input_pos=torch.arange(5)[None],
        )
    assert cache.size == 5 and cache.cache.abs().sum() > 0
    model.reset_caches()
    assert cache.size == 0 and cache.cache.abs().sum() == 0


def test_1b_cache_bytes_per_token_are_the_documented_numbers():
    # 576 values x 16 layers x 2 bytes vs 2 x 8 KV heads x 64 x 16 layers x 2 bytes
    assert kv_cache_bytes_per_token(mla_1b) == 18_432
    assert kv_cache_bytes_per_token(gqa_1b) == 32_768


def test_kv_cache_report_prints_the_readme_table():
    """``python benchmarks/kv_cache_report.py`` (and the main job): the table of the README, rows measured (MHA:
    2 x 16 heads x 128 x 16 layers x 2 bytes; fp8 MLA: 16 layers x 656-byte rows)."""
    table = kv_cache_table().splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert list(rows) == ["mla_1b", "mla_1b_fp8", "gqa_1b", "mha_1b"]
    assert [rows[m][1] for m in rows] == ["18,432", "10,496", "32,768", "131,072"]
    assert rows["mha_1b"][-1] == "7.11x" and rows["gqa_1b"][-1] == "1.78x" and rows["mla_1b_fp8"][-1] == "0.57x"
    assert rows["mla_1b"][4:6] == ["2.2", "GiB"]  # at 128k tokens
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(line.rstrip() in readme for line in table), "README's KV-cache table is out of date"


def test_tiny_builder_has_the_latent_vllm_needs():
    config = mla_tiny().mla_config
    assert config.kv_lora_rank + config.qk_rope_head_dim == 576
