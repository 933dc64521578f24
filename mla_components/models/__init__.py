"""The MLA model family as Torchtune builders (``_component_: mla_components.models.mla_tiny``)."""

from mla_components.models._component_builders import mla, mla_attention
from mla_components.models._config import MLAConfig
from mla_components.models._convert_weights import mla_hf_to_tune, mla_tune_to_hf
from mla_components.models._model_builders import MLA_1B, MLA_TINY, gqa_1b, gqa_tiny, mha_1b, mla_1b, mla_tiny

__all__ = [
    "MLAConfig",
    "MLA_1B",
    "MLA_TINY",
    "gqa_1b",
    "gqa_tiny",
    "mha_1b",
    "mla",
    "mla_1b",
    "mla_attention",
    "mla_hf_to_tune",
    "mla_tiny",
    "mla_tune_to_hf",
]
