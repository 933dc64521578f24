"""Torchtune's own ``eleuther_eval`` recipe, runnable offline with lm-eval 0.4.5-0.4.8 and transformers 5 (used by
:mod:`mla_components.evaluation.eleuther_eval`, behind ``tune run mla_recipes/eleuther_eval.py``).

Targets lm-eval==0.4.8 (the newest of the 0.4.5-0.4.8 the pinned torchtune==0.6.1 recipe accepts; another one fails
tests/test_compat.py until this is re-read against it) and that recipe file; ``RELIES_ON`` fingerprints what the
wrapper below stands in for. Why not lm-eval's public API: Torchtune's ``_LLMEvalWrapper``
is an ``HFLM`` subclass whose ``__init__`` hard-codes ``pretrained="gpt2"``, and ``HFLM(pretrained=<module>)``
needs a transformers ``PreTrainedModel`` (``config``, ``device``, ``tie_weights``) and an HF tokenizer, neither of
which a Torchtune decoder and tokenizer are; the wrapper keeps the recipe's own request handling.

This runs Torchtune 0.6.1's ``recipes/eleuther_eval.py`` unchanged (its ``setup``/``evaluate`` flow, checkpointer,
model and tokenizer instantiation) after three fixes that plain ``tune run eleuther_eval`` lacks here:

1. **transformers 5**: lm-eval <= 0.4.8 (the only versions the recipe accepts) imports
   ``transformers.AutoModelForVision2Seq``, which transformers 5 renamed ``AutoModelForImageTextToText``; without
   an alias the recipe fails at import.
2. **offline**: the recipe's wrapper calls ``HFLM.__init__(pretrained="gpt2")``, which downloads GPT-2 from the hub
   (0.5 GB) only to throw it away. The wrapper here sets the attributes the harness reads instead.
3. **the task's max_gen_toks**: the wrapper always generates 256 tokens; here the harness' ``max_length``
   (prompt + the task's ``max_gen_toks``) bounds generation, as lm-eval's own HF model does.

:func:`patch_recipe` also adds a task folder to ``include_path``, so project tasks and the harness' built-in ones
both resolve by name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

UPSTREAM = {"lm_eval": "0.4.8", "torchtune": "0.6.1"}
RELIES_ON = {
    # the attributes set by hand below are the ones this __init__ sets and its request paths read
    "lm_eval.models.huggingface.HFLM.__init__": "499638e600027acb023cb0cfcce116347d1da860e028f3e4531453bea0f2f646",
    "lm_eval.api.model.TemplateLM.__init__": "01fd06efe7f08c18c1cad83312648957e5c60af4a408b25a5f7c39aa2ca88616",
    "lm_eval.tasks.TaskManager.__init__": "56d22495017ca298a7d0fea0b4d6aabf54ff1f54c26cd67c0ba52aa41cffb1bc",
    # _LLMEvalWrapper (subclassed), TaskManager (wrapped) and recipe_main
    "torchtune-recipe:eleuther_eval.py": "a15fa17ef0b5dc3fd1980873ddff60609f4dcf4dfcf982d3a3a6588c605f1685",
}
_DEFAULT_MAX_GEN_TOKS = 256  # Torchtune's _LLMEvalWrapper.max_gen_toks


def _alias_transformers_v5() -> None:
    import peft  # noqa: F401 - imported by lm-eval; importing it re-creates the `transformers` module object

    transformers = sys.modules.get("transformers") or importlib.import_module("transformers")
    if not hasattr(transformers, "AutoModelForVision2Seq"):
        transformers.AutoModelForVision2Seq = transformers.AutoModelForImageTextToText


def load_torchtune_recipe() -> ModuleType:
    """Torchtune's ``eleuther_eval`` recipe module, loaded from its file (the wheel's top-level ``recipes`` package
    raises on import, so ``tune run`` itself loads built-in recipes by path too)."""
    import torchtune

    path = Path(torchtune.__file__).parent.parent / "recipes" / "eleuther_eval.py"
    if not path.is_file():
        raise FileNotFoundError(f"Torchtune's eleuther_eval recipe is not at {path}; is torchtune 0.6.1 installed?")
    _alias_transformers_v5()
    spec = importlib.util.spec_from_file_location("torchtune_eleuther_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def patch_recipe(module: ModuleType, tasks_dir: Path) -> ModuleType:
    """Swap the recipe's text wrapper for :func:`offline_wrapper_class` and add ``tasks_dir`` to the task paths."""
    module._LLMEvalWrapper = offline_wrapper_class(module._LLMEvalWrapper)
    task_manager = module.TaskManager

    def task_manager_with_project_tasks(include_path=None, **kwargs):
        paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
        return task_manager(include_path=[*map(str, paths), str(tasks_dir)], **kwargs)

    module.TaskManager = task_manager_with_project_tasks
    return module


def offline_wrapper_class(base: type) -> type:
    """A subclass of Torchtune's ``_LLMEvalWrapper`` that needs no hub and honours the task's ``max_gen_toks``."""
    import transformers
    from lm_eval.api.model import TemplateLM

    class OfflineLLMEvalWrapper(base):
        def __init__(
            self,
            model,
            tokenizer,
            *,
            device,
            max_seq_length=4096,
            batch_size=8,
            dtype=torch.float32,
            enable_kv_cache=True,
        ):
            TemplateLM.__init__(self)  # rank 0 of 1, no request cache; skips HFLM's GPT-2 download
            # What HFLM.__init__ would have set and its generate_until/loglikelihood paths read.
            self._device = torch.device(device)
            self.backend = "causal"
            self.AUTO_MODEL_CLASS = transformers.AutoModelForCausalLM
            self.tokenizer = None
            self.truncation = False
            self.logits_cache = True
            self.vocab_size = model.output.weight.shape[0] if hasattr(model.output, "weight") else None
            self.add_bos_token = False
            self.custom_prefix_token_id = None
            self.batch_schedule = 1
            self.batch_sizes = {}
            self.max_batch_size = batch_size
            self.pretrained = None
            self.peft = None
            self.delta = None
            self.revision = None
            # Torchtune's wrapper state.
            self._model = model
            self._tokenizer = tokenizer
            self._max_seq_length = max_seq_length
            self._batch_size = batch_size
            self._dtype = dtype
            self._enable_kv_cache = enable_kv_cache
            self._task_max_gen_toks = None

        @property
        def prefix_token_id(self):
            return self._tokenizer.bos_id

        @property
        def max_gen_toks(self):
            return self._task_max_gen_toks or _DEFAULT_MAX_GEN_TOKS

        def _model_generate(self, context, **generation_kwargs):
            max_length = generation_kwargs.pop("max_length", None)
            self._task_max_gen_toks = None if max_length is None else max_length - context.shape[1]
            try:
                return super()._model_generate(context, **generation_kwargs)
            finally:
                self._task_max_gen_toks = None

    OfflineLLMEvalWrapper.__name__ = OfflineLLMEvalWrapper.__qualname__ = "OfflineLLMEvalWrapper"
    return OfflineLLMEvalWrapper
