"""Pretrained Llama-family checkpoints in (GGUF or HF directory) and their conversion to DeepSeek-V3 MLA.

Names resolve lazily, so ``python -m mla_components.conversion.origin`` runs its module once (no runpy warning).
"""

import importlib
from typing import Any

_ORIGIN = "mla_components.conversion.origin"
_MATH = "mla_components.conversion.gqa_to_mla"
_PIPELINE = "mla_components.conversion.pipeline"
_EXPORTS = {
    "ConversionResult": _MATH,
    "LayerCalibration": _MATH,
    "OriginShape": _MATH,
    "calibrate": _PIPELINE,
    "check_conversion_args": _MATH,
    "compare_on_heldout": _PIPELINE,
    "convert_llama_to_mla": _MATH,
    "mla_config_for": _MATH,
    "run_conversion": _PIPELINE,
    "OriginCheckpoint": _ORIGIN,
    "default_gguf_path": _ORIGIN,
    "gguf_architecture": _ORIGIN,
    "gguf_metadata": _ORIGIN,
    "origin_attention_shape": _ORIGIN,
    "load_gguf_with_transformers": _ORIGIN,
    "load_hf_directory": _ORIGIN,
    "load_origin": _ORIGIN,
    "origin_from_transformers": _ORIGIN,
    "origin_model": _ORIGIN,
    "tune_state_dict": _ORIGIN,
    "write_origin": _ORIGIN,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
