"""The MLA model family as Torchtune builders (``_component_: mla_components.models.mla_tiny``), and the pretrained
Llama-family origin models converted to it (``smollm2_135m``, ``llama_from_hf_config``)."""

from mla_components.models._component_builders import mla, mla_attention
from mla_components.models._config import MLAConfig
from mla_components.models._convert_weights import mla_hf_to_tune, mla_tune_to_hf
from mla_components.models._model_builders import (
    MLA_1B,
    MLA_TINY,
    SMOLLM2_135M_MLA,
    gqa_1b,
    gqa_tiny,
    mha_1b,
    mla_1b,
    mla_from_checkpoint,
    mla_tiny,
    smollm2_135m_mla,
)
from mla_components.models._origin import SMOLLM2_135M_CONFIG, llama_from_hf_config, smollm2_135m

__all__ = [
    "MLAConfig",
    "MLA_1B",
    "MLA_TINY",
    "SMOLLM2_135M_CONFIG",
    "SMOLLM2_135M_MLA",
    "gqa_1b",
    "gqa_tiny",
    "llama_from_hf_config",
    "mha_1b",
    "mla",
    "mla_1b",
    "mla_attention",
    "mla_from_checkpoint",
    "mla_hf_to_tune",
    "mla_tiny",
    "mla_tune_to_hf",
    "smollm2_135m",
    "smollm2_135m_mla",
]
