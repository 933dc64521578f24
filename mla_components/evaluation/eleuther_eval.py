"""Torchtune's own ``eleuther_eval`` recipe, runnable offline with lm-eval 0.4.5-0.4.8 and transformers 5, with this
project's lm-eval tasks.

    tune run mla_recipes/eleuther_eval.py --config configs/mla_tiny/eleuther_eval.yaml

Runs Torchtune 0.6.1's ``recipes/eleuther_eval.py`` unchanged after the fixes of
:mod:`mla_components.compat.lm_eval` (what they fix: its docstring and docs/evaluation.md), with the project's task
folder (``lm_eval_tasks/``: ``mla_passkey``) added to ``include_path``.
"""

import sys
from pathlib import Path

from mla_components.compat.lm_eval import load_torchtune_recipe, patch_recipe

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


def main() -> None:
    recipe = patch_recipe(load_torchtune_recipe(), TASKS_DIR)
    sys.exit(recipe.recipe_main())


if __name__ == "__main__":
    main()
