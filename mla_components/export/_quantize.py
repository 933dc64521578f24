"""Weight-only torchao quantisation of an HF state dict, saved in torchao's safetensors form.

The saved layout is what transformers' ``TorchAoConfig`` and vLLM's ``--quantization torchao`` read back:
``<weight>:qdata`` / ``<weight>:scale`` tensors plus a JSON description of each tensor subclass in the file's
metadata, and ``config.json`` ``quantization_config = {"quant_method": "torchao", "quant_type": {"default": ...}}``.
Both readers need torchao >= 0.15 to load it (see docs/serving.md for what loads where).

This project pins torchao < 0.15 (torchtune 0.6.1 imports APIs that 0.15 removed), whose own safetensors helpers
write an older, incompatible key layout; so the >= 0.15 layout is written (and read) here, with torchao's JSON
encoding of each tensor subclass.
"""

import json
from typing import Any

import torch
from safetensors.torch import save_file
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


def _data_names(tensor: torch.Tensor) -> list[str]:
    names = [*getattr(tensor, "optional_tensor_data_names", []), *tensor.tensor_data_names]
    return [name for name in names if getattr(tensor, name) is not None]


def flatten_quantized(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """torchao (>= 0.15) safetensors layout: ``<module>._<param>_<data>`` tensors (e.g.
    ``model.layers.0.mlp.up_proj._weight_qdata``) and per-parameter JSON metadata naming the subclass."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    tensors, metadata = {}, {"tensor_names": json.dumps(list(hf_state))}
    for name, tensor in hf_state.items():
        if type(tensor) is torch.Tensor:
            tensors[name] = tensor.contiguous()
            metadata[name] = json.dumps({"_type": "Tensor"})
            continue
        description = json.loads(json.dumps(tensor, cls=TensorSubclassAttributeJSONEncoder))
        description["_tensor_data_names"] = _data_names(tensor)
        module, param = name.rsplit(".", 1)
        for data_name in description["_tensor_data_names"]:
            tensors[f"{module}._{param}_{data_name}"] = getattr(tensor, data_name).detach().contiguous()
        metadata[name] = json.dumps(description)
    return tensors, metadata


def unflatten_quantized(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten_quantized``: plain tensors and torchao tensor subclasses by parameter name."""
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    out = {}
    for name in json.loads(metadata["tensor_names"]):
        description = json.loads(metadata[name])
        if description["_type"] == "Tensor":
            out[name] = tensors[name]
            continue
        module, param = name.rsplit(".", 1)
        data = {key: tensors[f"{module}._{param}_{key}"] for key in description.pop("_tensor_data_names")}
        description["_data"].update(data)
        out[name] = object_from_dict(description)
    return out


def save_quantized_safetensors(hf_state: dict[str, torch.Tensor], path) -> None:
    """Save a state dict holding torchao tensor subclasses in torchao's safetensors layout."""
    tensors, metadata = flatten_quantized(hf_state)
    save_file(tensors, path, metadata={**metadata, "format": "pt"})
