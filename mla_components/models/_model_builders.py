"""Model builders with fixed sizes: the MLA models and their same-size GQA (and MHA) controls.

Every MLA builder accepts keyword overrides of its ``MLAConfig`` (e.g. ``max_seq_len``, ``kernel_backend``), so a
YAML config can write ``model: {_component_: mla_components.models.mla_tiny, kernel_backend: torch}``.
"""

import json
from pathlib import Path
from typing import Any

from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import TransformerDecoder

from mla_components.models._component_builders import mla
from mla_components.models._config import MLAConfig
from mla_components.modules.rope import identity_yarn

# Latent 512 + rope 64 = 576 cached values per token and layer: the head size vLLM's MLA backends require.
MLA_TINY = MLAConfig(
    vocab_size=512,  # byte-level tokenizer: 256 bytes + special tokens, padded
    num_layers=4,
    num_heads=4,
    embed_dim=256,
    intermediate_dim=768,
    max_seq_len=8192,
    q_lora_rank=128,
    kv_lora_rank=512,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    rope_base=10_000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    norm_eps=1e-6,
    tie_word_embeddings=False,
)

MLA_1B = MLAConfig(
    vocab_size=128_256,  # Llama-3 tokenizer
    num_layers=16,
    num_heads=16,
    embed_dim=2048,
    intermediate_dim=8192,
    max_seq_len=131_072,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    rope_base=10_000.0,
    # Trained at 8k, extended 16x with YaRN (DeepSeek-V3 style: mscale = mscale_all_dim = 1).
    rope_scaling={
        "type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 8192,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    norm_eps=1e-6,
    tie_word_embeddings=True,
)


def mla_tiny(**overrides: Any) -> TransformerDecoder:
    """Tiny MLA model for CPU tests and demos: 4 layers, d=256, 4 heads, q_lora 128, latent 512 + rope 64,
    nope/v 64, FFN 768, vocab 512, YaRN x4 over 2048 positions; 4,920,064 parameters (untied output)."""
    return mla(MLA_TINY.replace(**overrides))


def mla_1b(**overrides: Any) -> TransformerDecoder:
    """MLA 1B: 16 layers, d=2048, 16 heads, q_lora 1536, latent 512 + rope 64, nope/v 128, FFN 8192,
    vocab 128256 (Llama-3 tokenizer), tied embeddings, YaRN x16 over 8k = 128k context; 1,313,441,792
    parameters. KV cache: 576 values x 16 layers = 18,432 bytes per token in bf16."""
    return mla(MLA_1B.replace(**overrides))


def _llama_control(
    *,
    num_heads: int,
    num_kv_heads: int,
    like: MLAConfig,
    max_seq_len: int,
    norm_eps: float,
    rope_base: int,
    scale_factor: int,
) -> TransformerDecoder:
    """Torchtune's llama3_2 with ``like``'s width, depth, FFN, vocab and tying; its HF ``config.json`` (a
    ``LlamaForCausalLM`` with llama3 RoPE scaling) is kept on the model as ``model.hf_config`` for checkpoints."""
    model = llama3_2(
        vocab_size=like.vocab_size,
        num_layers=like.num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=like.embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=like.intermediate_dim,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=scale_factor,
        tie_word_embeddings=like.tie_word_embeddings,
    )
    model.hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": like.vocab_size,
        "hidden_size": like.embed_dim,
        "intermediate_size": like.intermediate_dim,
        "num_hidden_layers": like.num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": like.embed_dim // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_theta": float(rope_base),
        # torchtune's Llama3ScaledRoPE defaults: low 1, high 4, original context 8192
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(scale_factor),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": like.tie_word_embeddings,
    }
    return model


def gqa_tiny(max_seq_len: int = MLA_TINY.max_seq_len) -> TransformerDecoder:
    """GQA control for ``mla_tiny`` from Torchtune's llama3_2 parts: same d, layers, FFN, vocab and output;
    4 query heads / 2 KV heads of 64 dims; 3,410,176 parameters (MLA's 512-wide latent makes mla_tiny's
    attention larger at this width)."""
    return _llama_control(
        num_heads=4,
        num_kv_heads=2,
        like=MLA_TINY,
        max_seq_len=max_seq_len,
        norm_eps=MLA_TINY.norm_eps,
        rope_base=10_000,
        scale_factor=4,
    )


def gqa_1b(max_seq_len: int = MLA_1B.max_seq_len) -> TransformerDecoder:
    """GQA control for ``mla_1b``: the Llama-3.2-1B architecture (32 query / 8 KV heads of 64 dims) with the
    same d, layers, FFN, vocab and tied embeddings; 1,235,814,400 parameters. KV cache: 2 x 8 x 64 x 16 layers
    = 32,768 bytes per token in bf16."""
    return _llama_control(
        num_heads=32,
        num_kv_heads=8,
        like=MLA_1B,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        rope_base=500_000,
        scale_factor=32,
    )


def mha_1b(max_seq_len: int = MLA_1B.max_seq_len) -> TransformerDecoder:
    """MHA-equivalent of ``mla_1b`` for cache comparisons (DeepSeek-V2's baseline): 16 heads x 128 dims with full
    K/V; 1,336,477,696 parameters; 2 x 16 x 128 x 16 layers = 131,072 bytes per token in bf16."""
    return _llama_control(
        num_heads=16,
        num_kv_heads=16,
        like=MLA_1B,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        rope_base=500_000,
        scale_factor=32,
    )


# SmolLM2-135M-Instruct converted to MLA (mla_components.conversion): the origin's sizes, a full-rank query,
# nope = v = the origin's head dim (64), its RoPE theta; the latent width is the config's choice.
SMOLLM2_135M_MLA = MLAConfig(
    vocab_size=49_152,
    num_layers=30,
    num_heads=9,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    q_lora_rank=None,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    rope_base=100_000.0,
    rope_scaling=identity_yarn(8192),  # plain RoPE, written as YaRN factor 1 for vLLM
    norm_eps=1e-5,
    tie_word_embeddings=True,
)


def smollm2_135m_mla(**overrides: Any) -> TransformerDecoder:
    """SmolLM2-135M-Instruct as MLA: 30 layers, d=576, 9 heads, full-rank query, latent 256 + rope 64 by default
    (``kv_lora_rank=512`` for the servable 512 + 64), nope/v 64, FFN 1536, vocab 49152, tied, theta 100000.
    KV cache at 256 + 64: 320 values x 30 layers x 2 B = 19,200 bytes per token in bf16 (origin GQA: 23,040)."""
    return mla(SMOLLM2_135M_MLA.replace(**overrides))


def mla_from_checkpoint(checkpoint_dir: str, **overrides: Any) -> TransformerDecoder:
    """The MLA model described by an HF DeepseekV3 directory's ``config.json`` (e.g. a conversion's output), with
    ``MLAConfig`` overrides (``max_seq_len``, ``rope_scaling``, ``kernel_backend``, ...)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint_dir: {path} does not exist (expected an HF DeepseekV3 directory)")
    return mla(MLAConfig.from_hf_config(json.loads(path.read_text())).replace(**overrides))
