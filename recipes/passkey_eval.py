"""Passkey / needle-in-a-haystack evaluation recipe: accuracy over context length x needle depth, with a heatmap.

    tune run mla_recipes/passkey_eval.py --config configs/mla_tiny/passkey_eval.yaml \
        checkpointer.checkpoint_dir=outputs/mla_tiny/sft/epoch_2

``mla_recipes/passkey_eval.py`` is not a file path: ``tune run`` turns a recipe it does not know into a module name
(``mla_recipes.passkey_eval``) and runs it with ``runpy.run_module``, so the command works from any directory once
the package is installed. The config path is a real path (from an installed package:
``$(python -c 'import mla_recipes.configs as c, os; print(os.path.dirname(c.__file__))')/mla_tiny/passkey_eval.yaml``).

Config fields (``configs/mla_tiny/passkey_eval.yaml`` documents each): ``model``, ``checkpointer`` (one, or a list of
``{name, checkpointer, model?}`` for compare mode), ``tokenizer``, ``context_lengths``, ``depths``,
``trials_per_cell``, ``first_trial``, ``needle_kind``, ``seed``, ``max_new_tokens``, ``prefill_chunk``, ``device``,
``dtype``, ``output_dir``, and an optional ``judge`` (see ``mla_components.evaluation.judge``).

Writes ``results.json``, ``trials.csv``, ``cells.csv``, ``heatmap.png`` and ``summary.txt`` to ``output_dir``.

A config with ``results_dir`` (an earlier run) and a ``judge`` block runs only the LLM-as-a-judge stage over it
(``configs/mla_tiny/judge.yaml``).
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from mla_components.evaluation.judge import judge_config_run
from mla_components.evaluation.passkey import run


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for the recipe."""
    config.log_config(recipe_name="PasskeyEvalRecipe", cfg=cfg)
    if cfg.get("results_dir") is not None:
        judge_config_run(cfg)
    else:
        run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
