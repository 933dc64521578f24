"""Torchtune's ``eleuther_eval`` recipe, made to run offline with lm-eval 0.4.5-0.4.8 and transformers 5.

    tune run mla_recipes/eleuther_eval.py --config configs/mla_tiny/eleuther_eval.yaml

Runs Torchtune's own ``recipes/eleuther_eval.py`` unchanged after the fixes in
:mod:`mla_components.evaluation.eleuther_eval` (see docs/evaluation.md).
"""

from mla_components.evaluation.eleuther_eval import main

if __name__ == "__main__":
    main()
