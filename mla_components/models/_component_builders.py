"""Component builders for the MLA family: assemble Torchtune parts around ``MultiHeadLatentAttention``.

As in ``torchtune.models.llama3_2._component_builders``, builders take sizes and return modules; the
``_model_builders`` fix the sizes.
"""

from torch import nn
from torchtune.models.llama3_2._component_builders import llama3_mlp
from torchtune.modules import TiedLinear, TransformerDecoder, TransformerSelfAttentionLayer

from mla_components.models._config import MLAConfig
from mla_components.modules import MultiHeadLatentAttention, mla_softmax_scale
from mla_components.modules.backend import norm_and_rope_classes


def mla_attention(config: MLAConfig, pos_embeddings: nn.Module) -> MultiHeadLatentAttention:
    """One MLA block: low-rank (or full) query, ``d -> d_c + d_r`` latent down-projection, RMSNorm on the
    latent, ``d_c -> n_h * (d_n + d_v)`` up-projection and ``n_h * d_v -> d`` output projection, all bias-free."""
    c = config
    norm, _ = norm_and_rope_classes(c.kernel_backend)
    if c.q_lora_rank is None:
        query = dict(q_proj=nn.Linear(c.embed_dim, c.num_heads * c.qk_head_dim, bias=False))
    else:
        query = dict(
            q_a_proj=nn.Linear(c.embed_dim, c.q_lora_rank, bias=False),
            q_a_norm=norm(c.q_lora_rank, eps=c.norm_eps),
            q_b_proj=nn.Linear(c.q_lora_rank, c.num_heads * c.qk_head_dim, bias=False),
        )
    return MultiHeadLatentAttention(
        embed_dim=c.embed_dim,
        num_heads=c.num_heads,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        kv_lora_rank=c.kv_lora_rank,
        kv_a_proj=nn.Linear(c.embed_dim, c.kv_lora_rank + c.qk_rope_head_dim, bias=False),
        kv_a_norm=norm(c.kv_lora_rank, eps=c.norm_eps),
        kv_b_proj=nn.Linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False),
        output_proj=nn.Linear(c.num_heads * c.v_head_dim, c.embed_dim, bias=False),
        pos_embeddings=pos_embeddings,
        softmax_scale=mla_softmax_scale(c.qk_head_dim, c.rope_scaling),
        max_seq_len=c.max_seq_len,
        attn_dropout=c.attn_dropout,
        kernel_backend=c.kernel_backend,
        kv_cache_dtype=c.kv_cache_dtype,
        **query,
    )


def mla(config: MLAConfig) -> TransformerDecoder:
    """A dense DeepSeek-V3-style decoder: token embedding, ``num_layers`` x (RMSNorm, MLA, RMSNorm, SwiGLU MLP),
    final RMSNorm and (tied or separate) output projection. Input ``tokens [b, s]`` -> logits ``[b, s, vocab]``.

    The builder's ``MLAConfig`` is kept on the model as ``model.mla_config`` (for export and cache reports).
    """
    norm, rotary = norm_and_rope_classes(config.kernel_backend)
    rope = rotary(
        dim=config.qk_rope_head_dim,
        max_seq_len=config.max_seq_len,
        base=config.rope_base,
        rope_scaling=config.rope_scaling,
    )
    layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=mla_attention(config, rope),
            mlp=llama3_mlp(dim=config.embed_dim, hidden_dim=config.intermediate_dim),
            sa_norm=norm(config.embed_dim, eps=config.norm_eps),
            mlp_norm=norm(config.embed_dim, eps=config.norm_eps),
        )
        for _ in range(config.num_layers)
    )
    tok_embeddings = nn.Embedding(config.vocab_size, config.embed_dim)
    if config.tie_word_embeddings:
        output = TiedLinear(tok_embeddings)
    else:
        output = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
    model = TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=config.max_seq_len,
        num_heads=config.num_heads,
        head_dim=config.qk_head_dim,
        norm=norm(config.embed_dim, eps=config.norm_eps),
        output=output,
    )
    model.mla_config = config
    return model
