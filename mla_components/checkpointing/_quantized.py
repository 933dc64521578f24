"""torchao tensor subclasses (weight-only quantised exports) in torchao's safetensors layout.

The saved layout is what transformers' ``TorchAoConfig`` and vLLM's ``--quantization torchao`` read back:
``<module>._<param>_<data>`` tensors plus a JSON description of each tensor subclass in the file's metadata. Both
readers need torchao >= 0.15 to load it (see docs/serving.md for what loads where).

This project pins torchao < 0.15 (torchtune 0.6.1 imports APIs that 0.15 removed), whose own safetensors helpers
write an older, incompatible key layout; so the >= 0.15 layout is written (and read) here, with torchao's JSON
encoding of each tensor subclass.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


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


def save_quantized_safetensors(hf_state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict holding torchao tensor subclasses in torchao's safetensors layout."""
    tensors, metadata = flatten_quantized(hf_state)
    save_file(tensors, path, metadata={**metadata, "format": "pt"})


def read_quantized_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF state dict of a file written by :func:`save_quantized_safetensors`, every tensor dequantised to
    ``dtype``; a corrupted or truncated file is refused by name."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"refusing corrupted safetensors file {path}: {e}") from e
    return {
        k: (v.dequantize() if type(v) is not torch.Tensor else v).to(dtype)
        for k, v in unflatten_quantized(flat, metadata).items()
    }
