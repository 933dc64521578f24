"""Conversion recipe: a pretrained Llama-family model (GGUF or HF directory) -> a DeepSeek-V3 MLA checkpoint.

    tune run mla_recipes/convert_to_mla.py --config configs/smollm2_135m/convert_mla_256.yaml

Loads the origin (default: the bundled SmolLM2-135M-Instruct GGUF) into Torchtune's Llama classes, collects the
attention inputs' second moments on offline calibration text, converts every attention layer (TransMLA's RoRoPE
and balanced low-rank K/V, see ``mla_components.conversion.gqa_to_mla``), and writes ``output_dir/model`` (an HF
DeepseekV3 directory with the origin's tokenizer: Torchtune's recipes, transformers and vLLM load it) and
``output_dir/conversion_report.json`` (energy kept per layer, held-out perplexity of both models and the
next-token KL between them). Bad ranks are refused before any weights load.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from mla_components.conversion.pipeline import run_conversion


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for the recipe."""
    config.log_config(recipe_name="ConvertToMLARecipe", cfg=cfg)
    run_conversion(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
