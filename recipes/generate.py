"""Torchtune's ``generate`` recipe with each decode step replayed from a CUDA graph.

    tune run mla_recipes/generate.py --config configs/mla_1b/generation.yaml prompt.user="..."

The config is ``tune run generate``'s, plus ``cuda_graph`` (default true): on CUDA, with the KV cache enabled and
no quantizer, the first decode step runs eagerly and is captured, and every later step copies its token and position
into the graph and replays it (``mla_components.decoding.CudaGraphStep``); the prompt's prefill stays eager.
Sampling (``temperature``, ``top_k``) runs after each replay with Torchtune's own sampler, so the tokens are those of
``tune run generate``. Off CUDA, with ``cuda_graph: false``, or with a quantizer (Torchtune then compiles its own
decode step) this is ``tune run generate`` unchanged.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from mla_components.compat.torchtune import next_token_hook, upstream_recipe
from mla_components.decoding import CudaGraphStep

_upstream = upstream_recipe("generate.py")


class GraphInferenceRecipe(_upstream.InferenceRecipe):
    """Torchtune's ``InferenceRecipe`` whose decode steps replay from a CUDA graph."""

    def uses_cuda_graph(self, cfg: DictConfig) -> bool:
        return (
            bool(cfg.get("cuda_graph", True))
            and self._device.type == "cuda"
            and bool(cfg.enable_kv_cache)
            and self._quantization_mode is None
        )

    def generate(self, cfg: DictConfig) -> None:
        if not self.uses_cuda_graph(cfg):
            return super().generate(cfg)
        with next_token_hook(_upstream, lambda model: CudaGraphStep(model, enabled=True).next_token):
            return super().generate(cfg)


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="GraphInferenceRecipe", cfg=cfg)
    recipe = GraphInferenceRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.generate(cfg=cfg)


if __name__ == "__main__":
    sys.exit(main())
