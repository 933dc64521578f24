"""Export a training checkpoint as a servable HF DeepseekV3 directory (vLLM, transformers), optionally quantised.

    python -m mla_components.export --checkpoint outputs/mla_1b/epoch_2 --output exports/mla_1b
    python -m mla_components.export --checkpoint outputs/mla_1b/epoch_2 --output exports/mla_1b-int8 \
        --quantize int8_weight_only
"""

from mla_components.export._export import (
    DTYPES,
    EXPORT_MARKER,
    check_output,
    export_checkpoint,
    load_exported_checkpoint,
)
from mla_components.export._quantize import QUANTIZATIONS
from mla_components.export._validate import ExportError, serving_config_problems, validate_serving_config

__all__ = [
    "DTYPES",
    "EXPORT_MARKER",
    "ExportError",
    "QUANTIZATIONS",
    "check_output",
    "export_checkpoint",
    "load_exported_checkpoint",
    "serving_config_problems",
    "validate_serving_config",
]
