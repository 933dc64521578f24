"""Checks that an HF ``config.json`` describes a model that vLLM and transformers serve as dense DeepseekV3 MLA."""

from typing import Any

# vLLM's MLA decode kernels (FlashMLA, FlashInfer-MLA, CUTLASS-MLA) support one latent width: 512 + 64 = 576.
VLLM_KV_LORA_RANK = 512
VLLM_QK_ROPE_HEAD_DIM = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ExportError(ValueError):
    """A checkpoint that cannot be exported for serving; the message names every offending field and the fix."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def serving_config_problems(config: dict[str, Any]) -> list[str]:
    """Every reason ``config`` (a ``config.json`` dict) would not serve as a dense DeepseekV3 MLA model.

    Returns an empty list when it serves. Each entry names the field, its value, and what it must be.
    """
    problems = []
    if config.get("model_type") != "deepseek_v3":
        problems.append(
            f"model_type is {config.get('model_type')!r}: export serves MLA checkpoints only (model_type "
            "'deepseek_v3', written by the mla_* builders); the GQA control ('llama') is not exported"
        )
        return problems  # the remaining fields are DeepseekV3's
    if "DeepseekV3ForCausalLM" not in (config.get("architectures") or []):
        problems.append(
            f"architectures is {config.get('architectures')!r}: must contain 'DeepseekV3ForCausalLM' "
            "(vLLM picks its model class from it)"
        )
    layers = config.get("num_hidden_layers")
    if config.get("first_k_dense_replace") != layers:
        problems.append(
            f"first_k_dense_replace is {config.get('first_k_dense_replace')!r}: must equal num_hidden_layers "
            f"({layers!r}) so that every layer is dense (the MLA builders have no MoE)"
        )
    if not _is_int(config.get("n_routed_experts")):
        problems.append(
            f"n_routed_experts is {config.get('n_routed_experts')!r}: must be an integer (e.g. 1) even for a "
            "dense model, because vLLM's DeepseekV3 weight loader does arithmetic on it"
        )
    if config.get("rope_interleave") is not True:
        problems.append(
            f"rope_interleave is {config.get('rope_interleave')!r}: must be true (the checkpoint stores rope "
            "dims as interleaved pairs; false would make transformers rotate the wrong dims)"
        )
    if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get("num_attention_heads"):
        problems.append(
            f"num_key_value_heads is {config.get('num_key_value_heads')!r}: must equal num_attention_heads "
            f"({config.get('num_attention_heads')!r}) for MLA"
        )
    rope_scaling = config.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type != "yarn":
        problems.append(
            f"rope_scaling is {config.get('rope_scaling')!r}: must be a YaRN dict "
            "({'rope_type': 'yarn', 'factor': ..., 'original_max_position_embeddings': ...}) for long context"
        )
    else:
        for key in ("factor", "original_max_position_embeddings"):
            if not isinstance(rope_scaling.get(key), (int, float)) or rope_scaling[key] <= 0:
                problems.append(f"rope_scaling.{key} is {rope_scaling.get(key)!r}: must be a positive number")
    kv_lora, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    if (kv_lora, rope) != (VLLM_KV_LORA_RANK, VLLM_QK_ROPE_HEAD_DIM):
        problems.append(
            f"kv_lora_rank + qk_rope_head_dim is {kv_lora!r} + {rope!r}: vLLM's MLA kernels need "
            f"{VLLM_KV_LORA_RANK} + {VLLM_QK_ROPE_HEAD_DIM} (a latent head of 576); build the model with "
            f"kv_lora_rank={VLLM_KV_LORA_RANK}, qk_rope_head_dim={VLLM_QK_ROPE_HEAD_DIM}"
            + (
                f", or export a smaller latent widened with zeros: --pad-latent {VLLM_KV_LORA_RANK}"
                if rope == VLLM_QK_ROPE_HEAD_DIM and isinstance(kv_lora, int) and kv_lora < VLLM_KV_LORA_RANK
                else ""
            )
        )
    return problems


def validate_serving_config(config: dict[str, Any]) -> None:
    """Raise ``ExportError`` listing every problem of ``serving_config_problems(config)``."""
    problems = serving_config_problems(config)
    if problems:
        raise ExportError("config.json cannot be served:\n  - " + "\n  - ".join(problems))
