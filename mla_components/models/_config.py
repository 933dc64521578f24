"""The hyper-parameters of one MLA model, their validation, and their HF DeepseekV3 ``config.json`` form."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from mla_components._validation import check_positive_int, check_rope_dim, is_positive_int
from mla_components.modules.backend import validate_kernel_backend
from mla_components.modules.kv_cache import validate_kv_cache_dtype
from mla_components.modules.rope import validate_rope_scaling
from mla_kernels.fp8 import FP8_GROUP_SIZE


@dataclass(frozen=True)
class MLAConfig:
    """Sizes of a dense DeepSeek-V3-style decoder with MLA attention.

    Field names follow Torchtune's builders; ``to_hf_config`` gives the HF DeepseekV3 names.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_base: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-6
    attn_dropout: float = 0.0
    tie_word_embeddings: bool = True
    kernel_backend: str = "auto"
    kv_cache_dtype: str = "bf16"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_layers",
            "num_heads",
            "embed_dim",
            "intermediate_dim",
            "max_seq_len",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            check_positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None and not is_positive_int(self.q_lora_rank):
            raise ValueError(
                f"q_lora_rank must be a positive integer (low-rank query) or None (one projection), "
                f"got {self.q_lora_rank!r}"
            )
        check_rope_dim(self.qk_rope_head_dim)
        if not self.rope_base > 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1], got {self.attn_dropout}")
        validate_kernel_backend(self.kernel_backend)
        validate_kv_cache_dtype(self.kv_cache_dtype, self.kv_lora_rank)
        validate_rope_scaling(self.rope_scaling)
        if self.rope_scaling:  # one canonical form: YaRN is the only kind, so the type tag is implied
            canonical = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")}
            object.__setattr__(self, "rope_scaling", canonical)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values cached per token per layer: ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_bytes_per_token_layer(self, itemsize: int = 2) -> int:
        """Cache bytes per token and layer: ``kv_cache_width * itemsize`` unquantised (1,152 for 512 + 64 in bf16);
        with fp8 the latent in 1 B, 4 B per 128-value scale group and the rope key in bf16 (656 for 512 + 64)."""
        if self.kv_cache_dtype == "fp8_e4m3":
            return self.kv_lora_rank + 4 * (self.kv_lora_rank // FP8_GROUP_SIZE) + 2 * self.qk_rope_head_dim
        return self.kv_cache_width * itemsize

    def to_hf_config(self, **extra: Any) -> dict[str, Any]:
        """A dense HF DeepseekV3 ``config.json`` that transformers and vLLM load as-is.

        Dense = every layer below ``first_k_dense_replace``; ``n_routed_experts`` stays an integer because
        vLLM's weight loader does arithmetic on it even when no MoE layer exists.
        """
        rope_scaling = None
        if self.rope_scaling:
            rope_scaling = {"type": "yarn", "rope_type": "yarn"}
            rope_scaling.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")})
        config = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "moe_intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "first_k_dense_replace": self.num_layers,
            "n_routed_experts": 1,
            "n_shared_experts": 1,
            "num_experts_per_tok": 1,
            "n_group": 1,
            "topk_group": 1,
            "moe_layer_freq": 1,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
            "num_nextn_predict_layers": 0,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": rope_scaling,
            "rope_interleave": True,
            "attention_bias": False,
            "attention_dropout": self.attn_dropout,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
        }
        config.update(extra)
        return config

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides: Any) -> "MLAConfig":
        """Read a dense HF DeepseekV3 ``config.json`` dict; raises ``ValueError`` naming what does not fit."""
        if config.get("model_type") != "deepseek_v3":
            raise ValueError(f"config.json model_type must be 'deepseek_v3', got {config.get('model_type')!r}")
        layers = config["num_hidden_layers"]
        if config.get("first_k_dense_replace", 0) < layers:
            raise ValueError(
                "config.json describes MoE layers (first_k_dense_replace < num_hidden_layers); "
                "the MLA builders are dense"
            )
        heads = config["num_attention_heads"]
        if config.get("num_key_value_heads", heads) != heads:
            raise ValueError("config.json num_key_value_heads must equal num_attention_heads for MLA")
        rope_scaling = config.get("rope_scaling") or config.get("rope_parameters")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        if rope_scaling:
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        values = dict(
            vocab_size=config["vocab_size"],
            num_layers=layers,
            num_heads=heads,
            embed_dim=config["hidden_size"],
            intermediate_dim=config["intermediate_size"],
            max_seq_len=config["max_position_embeddings"],
            q_lora_rank=config.get("q_lora_rank"),
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            rope_base=float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 1e4))),
            rope_scaling=rope_scaling,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            attn_dropout=float(config.get("attention_dropout", 0.0)),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
        values.update(overrides)
        return cls(**values)

    def replace(self, **overrides: Any) -> "MLAConfig":
        """A copy with some fields changed (validated again); unknown names raise ``ValueError``."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown MLA builder argument(s) {sorted(unknown)}; known: {sorted(known)}")
        return MLAConfig(**{**asdict(self), **overrides})
