"""The project's lm-eval task (local data) through Torchtune's eleuther_eval recipe, offline."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mla_components.data import byte_tokenizer
from mla_components.evaluation.passkey import PasskeyGrid, lm_eval_documents, make_trials
from tests._requirements import unavailable
from tests.eval.conftest import REPO


@pytest.fixture(autouse=True)
def _lm_eval_installed():
    # found, not imported: lm-eval <= 0.4.8 cannot be imported under transformers 5 until the recipe's fix runs
    if importlib.util.find_spec("lm_eval") is None:
        unavailable('lm-eval is not installed (pip install -e ".[eval]")')


TUNE = str(Path(sys.executable).with_name("tune"))


def test_task_documents_are_the_recipe_prompts():
    grid = {"context_lengths": [400], "depths": [0.0, 1.0], "trials_per_cell": 2, "seed": 3}
    docs = lm_eval_documents(**grid)
    trials = make_trials(byte_tokenizer(), PasskeyGrid.from_config(OmegaConf.create(grid)))
    assert [d["answer"] for d in docs] == [t.sample.answer for t in trials]
    assert all(d["prompt"] == f"{t.sample.prompt}\nAnswer:" for d, t in zip(docs, trials, strict=True))


LOCAL_MC_TASK = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def test_mla_passkey_runs_through_eleuther_eval_offline(tiny_checkpoint, tmp_path):
    # a user task folder next to the project's: a multiple-choice task with local data (the loglikelihood path that
    # standard tasks such as hellaswag take)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [("The sky is", ["blue", "green"], 0), ("Fire is", ["cold", "hot"], 1)]
    (tasks / "data.jsonl").write_text(
        "".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n" for q, c, y in rows)
    )
    (tasks / "local_mc.yaml").write_text(LOCAL_MC_TASK.format(data=tasks / "data.jsonl"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # any hub access would fail the run
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        [
            TUNE,
            "run",
            "mla_recipes/eleuther_eval.py",
            "--config",
            str(REPO / "configs/mla_tiny/eleuther_eval.yaml"),
            f"checkpointer.checkpoint_dir={tiny_checkpoint}",
            f"output_dir={tmp_path / 'out'}",
            "limit=2",
            "tasks=[mla_passkey,local_mc]",
            f"include_path={tasks}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Running generate_until requests: 100%|██████████| 2/2" in output
    # |mla_passkey|      1|first_digits|None  |exact_match|↑  |    0|±  |     0|
    row = re.search(r"\|mla_passkey\s*\|\s*1\|first_digits\|[^|]*\|exact_match\|[^|]*\|\s*([\d.]+)\|", output)
    assert row, output[-3000:]
    assert 0.0 <= float(row.group(1)) <= 1.0
    row = re.search(r"\|local_mc\s*\|\s*1\|none\s*\|[^|]*\|acc\s*\|[^|]*\|\s*([\d.]+)\|", output)
    assert row and float(row.group(1)) in (0.0, 0.5, 1.0), output[-3000:]  # 2 documents


# Replies of a model whose answers are known, and the score the passkey recipe's rule gives each.
KNOWN_REPLIES = [
    ("{answer}", 1.0),  # the value alone
    (" The pass key is {answer}.", 1.0),  # wrapped in a sentence: the first digit run counts
    ("{wrong}", 0.0),  # one digit off
    ("{answer}0", 0.0),  # an extra digit
    ("no idea", 0.0),  # no digits at all
]


def test_mla_passkey_scoring_through_the_real_harness():
    """The task's own filters and metric (regex first digit run + exact_match), run by lm-eval's evaluator on a
    model whose replies are known: every document scores exactly what the passkey recipe's rule gives."""
    from mla_components.compat.lm_eval import _alias_transformers_v5
    from mla_components.evaluation.eleuther_eval import TASKS_DIR

    _alias_transformers_v5()  # lm-eval <= 0.4.8 reads a name transformers 5 renamed
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    docs = lm_eval_documents([512, 1024], [0.0, 0.25, 0.5, 0.75, 1.0], 4)  # the task's dataset_kwargs
    index = {d["prompt"]: i for i, d in enumerate(docs)}

    class KnownReplies(LM):
        def generate_until(self, requests):
            out = []
            for request in requests:
                i = index[request.args[0]]
                answer = docs[i]["answer"]
                wrong = answer[:-1] + str((int(answer[-1]) + 1) % 10)
                out.append(KNOWN_REPLIES[i % len(KNOWN_REPLIES)][0].format(answer=answer, wrong=wrong))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    limit = 2 * len(KNOWN_REPLIES)
    results = simple_evaluate(
        model=KnownReplies(),
        tasks=["mla_passkey"],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=limit,
        log_samples=True,
    )
    samples = results["samples"]["mla_passkey"]
    assert len(samples) == limit
    for sample in samples:
        assert sample["exact_match"] == KNOWN_REPLIES[sample["doc_id"] % len(KNOWN_REPLIES)][1], sample
    expected = sum(KNOWN_REPLIES[i % len(KNOWN_REPLIES)][1] for i in range(limit)) / limit
    assert results["results"]["mla_passkey"]["exact_match,first_digits"] == pytest.approx(expected)
