"""Weight-only torchao quantisation of an HF state dict, and its ``config.json`` entry.

``config.json`` gets ``quantization_config = {"quant_method": "torchao", "quant_type": {"default": ...}}``, what
transformers' ``TorchAoConfig`` and vLLM's ``--quantization torchao`` read; the weights are written (and read
back) in torchao's safetensors layout by :mod:`mla_components.checkpointing._quantized`.
"""

from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("int8_weight_only", "float8_weight_only")

# Projections that vLLM runs through ``LinearBase`` layers (the only ones its torchao method quantises). The
# embedding, lm_head and norms stay in the export dtype, as transformers' TorchAoConfig also leaves them.
_QUANTIZED_SUFFIXES = (
    "q_proj.weight",
    "q_a_proj.weight",
    "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)
UNQUANTIZED_MODULES = ["lm_head"]


def torchao_config(name: str):
    """The torchao ``AOBaseConfig`` of a ``--quantize`` choice.

    ``int8_weight_only`` is symmetric per-output-channel int8 (Int8WeightOnlyConfig's scheme), expressed as
    ``IntxWeightOnlyConfig(int8, PerAxis(0))`` because its tensor (``IntxUnpackedToInt8Tensor``) is one that
    torchao's safetensors support serialises; ``Int8WeightOnlyConfig``'s ``AffineQuantizedTensor`` is not.
    ``float8_weight_only`` is e4m3 per-output-channel (``Float8Tensor``); fp8 matmuls need an sm89+ GPU in
    vLLM, elsewhere the weight is dequantised on the fly.
    """
    from torchao.quantization import Float8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis

    if name == "int8_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if name == "float8_weight_only":
        return Float8WeightOnlyConfig()
    raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {name!r}")


def quantize_weights(hf_state: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every projection weight ``[out, in]`` of ``hf_state`` as a torchao-quantised tensor; the rest cast to
    ``dtype``.

    int8 quantises in float32 and only then moves to ``dtype``: torchao floors the int8 scale at
    ``finfo(input dtype).eps``, which for bfloat16 is 2**-7 -- far above the per-row scale of typically
    initialised weights (std 0.02 -> scale ~5e-4), so quantising bf16 weights directly rounds most of them to 0.
    fp8 has no such floor and quantises from ``dtype`` (its tensor keeps the dtype it was made from).
    """
    from torchao.quantization import quantize_

    config = torchao_config(name)
    source_dtype = torch.float32 if name == "int8_weight_only" else dtype
    out = {}
    for key, weight in hf_state.items():
        if key.endswith(_QUANTIZED_SUFFIXES):
            linear = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=source_dtype))
            linear[0].weight = nn.Parameter(weight.detach().to(source_dtype), requires_grad=False)
            quantize_(linear, config)  # quantize_ swaps child modules only, hence the Sequential
            out[key] = linear[0].weight.detach().to(dtype)
        else:
            out[key] = weight.detach().to(dtype)
    return out


def quantization_config(name: str) -> dict[str, Any]:
    """The ``config.json`` ``quantization_config`` entry transformers and vLLM read for a torchao checkpoint."""
    from torchao.core.config import config_to_dict

    return {
        "quant_method": "torchao",
        "quant_type": {"default": config_to_dict(torchao_config(name))},
        "modules_to_not_convert": list(UNQUANTIZED_MODULES),
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }
