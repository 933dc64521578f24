"""The passkey recipe run as users run it (``tune run``), and its fail-fast config checks."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from omegaconf import OmegaConf

from mla_components.data import byte_tokenizer
from mla_components.evaluation.passkey import PasskeyGrid, load_checkpointed_model, make_trials, run
from mla_components.evaluation.report import journal_result, merge_reports
from mla_components.evaluation.report import main as report_main
from tests.eval.conftest import PASSKEY_CONFIG, SMALL_GRID

TUNE = str(Path(sys.executable).with_name("tune"))


def test_tune_run_writes_json_csv_png_from_any_directory(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    overrides = [f"{k}={json.dumps(v)}" for k, v in SMALL_GRID.items()]
    proc = subprocess.run(
        [
            TUNE,
            "run",
            "mla_recipes/passkey_eval.py",
            "--config",
            str(PASSKEY_CONFIG),
            f"checkpointer.checkpoint_dir={tiny_checkpoint}",
            f"output_dir={out}",
            *overrides,
        ],
        cwd=tmp_path,  # not the repository: the recipe resolves as the installed module mla_recipes.passkey_eval
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    (model,) = results["models"]
    assert [(c["context_tokens"], c["depth"], c["trials"]) for c in model["cells"]] == [
        (400, 0.0, 2),
        (400, 1.0, 2),
        (512, 0.0, 2),
        (512, 1.0, 2),
    ]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in model["cells"])
    assert 0.0 <= model["overall_accuracy"] <= 1.0
    # the prompts are the data API's eval-split samples for the recipe's per-trial seeds: deterministic from `seed`
    grid = PasskeyGrid.from_config(OmegaConf.create({**SMALL_GRID, "seed": 0}))
    expected = make_trials(byte_tokenizer(), grid)
    assert [(t["answer"], t["prompt_tokens"]) for t in model["trials"]] == [
        (t.sample.answer, len(t.prompt)) for t in expected
    ]
    # the latent cache of each row: 4 layers x (512 + 64) fp32 values per token, sized for longest prompt + new tokens
    for row in model["lengths"]:
        longest = max(t["prompt_tokens"] for t in model["trials"] if t["context_tokens"] == row["context_tokens"])
        assert row["kv_cache_bytes"] == 4 * 576 * 4 * (longest + SMALL_GRID["max_new_tokens"])
    assert model["peak_memory_bytes"] > 0 and model["peak_memory_kind"] == "cpu_max_rss"

    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["correct"] for r in rows} <= {"True", "False"}
    with (out / "cells.csv").open() as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 4 and all(0.0 <= float(c["accuracy"]) <= 1.0 for c in cells)
    image = matplotlib.image.imread(out / "heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 2 and summary[0].startswith("mla_tiny @     400 tokens: accuracy")


def test_a_grid_split_by_first_trial_has_the_prompts_of_the_whole_grid():
    """Split over processes (one 1M prompt per GPU), trials ``first_trial ..`` of each cell are the same prompts, with
    the same trial indices, as in one run of the whole grid; none repeats."""
    whole = {"context_lengths": [400], "depths": [0.0, 1.0], "trials_per_cell": 4, "seed": 5}
    tokenizer = byte_tokenizer()

    def prompts(**fields):
        trials = make_trials(tokenizer, PasskeyGrid.from_config(OmegaConf.create({**whole, **fields})))
        return {(t.depth, t.trial): (t.seed, tuple(t.prompt)) for t in trials}

    everything = prompts()
    parts = [
        prompts(trials_per_cell=1, first_trial=3),
        prompts(trials_per_cell=3),
        prompts(depths=[1.0], trials_per_cell=2, first_trial=2),
    ]
    assert sorted(parts[0]) == [(0.0, 3), (1.0, 3)] and sorted(parts[1]) == [
        (d, t) for d in (0.0, 1.0) for t in range(3)
    ]
    for part in parts:
        assert all(everything[key] == prompt for key, prompt in part.items())
    assert len({seed for seed, _ in everything.values()}) == 8


def _must_not_load(entry):
    raise AssertionError("weights were loaded before the config error was reported")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depths": [0.0, 1.5]}, "depths must be"),
        ({"context_lengths": [512, 8190]}, r"context_lengths \[8190\] \+ max_new_tokens \(8\) exceed mla_tiny"),
        ({"context_lengths": []}, "context_lengths must be"),
        ({"trials_per_cell": 0}, "trials_per_cell must be"),
        ({"first_trial": -1}, r"first_trial must be an integer >= 0 \(default 0\), got -1"),
        ({"cuda_graph": "yes"}, "cuda_graph must be true or false, got 'yes'"),
        ({"checkpointer": {"checkpoint_dir": "/nonexistent/epoch_9"}}, r"checkpointer.checkpoint_dir=/nonexistent"),
        ({"checkpointer": [{"checkpointer": {"checkpoint_dir": "x"}}]}, r"checkpointer\[0\] must be"),
        ({"output_dir": None}, "output_dir is not set"),
    ],
)
def test_bad_config_fails_before_loading_weights(passkey_cfg, overrides, message):
    if isinstance(overrides.get("checkpointer"), list):
        passkey_cfg.checkpointer = OmegaConf.create(overrides.pop("checkpointer"))
    cfg = OmegaConf.merge(passkey_cfg, overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(cfg, load_model=_must_not_load)


def test_fp8_cache_compare_run_reports_the_allocated_bytes_of_each_cache(passkey_cfg):
    """One checkpoint twice in compare mode, with the bf16 and the fp8 latent cache (``model.kv_cache_dtype``): the
    report's bytes are the allocated ones, 4 layers x 576 x 4 B (fp32 run) vs 4 layers x 656 B per token."""
    single = passkey_cfg.checkpointer
    model = OmegaConf.to_container(passkey_cfg.model)
    passkey_cfg.checkpointer = OmegaConf.create(
        [
            {"name": "bf16_cache", "checkpointer": single},
            {"name": "fp8_cache", "checkpointer": single, "model": {**model, "kv_cache_dtype": "fp8_e4m3"}},
        ]
    )
    cfg = OmegaConf.merge(passkey_cfg, {"context_lengths": [400], "depths": [0.5], "trials_per_cell": 1})
    paths = run(cfg)
    bf16, fp8 = json.loads(paths["json"].read_text())["models"]
    assert (bf16["kv_cache_dtype"], fp8["kv_cache_dtype"]) == ("bf16", "fp8_e4m3")
    tokens = bf16["trials"][0]["prompt_tokens"] + SMALL_GRID["max_new_tokens"]
    assert bf16["lengths"][0]["kv_cache_bytes"] == 4 * 576 * 4 * tokens
    assert fp8["lengths"][0]["kv_cache_bytes"] == 4 * 656 * tokens
    assert "fp8_e4m3" in paths["summary"].read_text().splitlines()[1]


def test_model_names_selects_entries_and_distractor_answers_are_counted(passkey_cfg):
    """``model_names`` runs a subset of a compare config (unknown names refused before any weight is read); the
    multi-needle report counts answers that are another planted value."""
    single = passkey_cfg.checkpointer
    passkey_cfg.checkpointer = OmegaConf.create(
        [{"name": "a", "checkpointer": single}, {"name": "b", "checkpointer": single}]
    )
    with pytest.raises(ValueError, match=r"`model_names`: \['c'\] not among the config's models \['a', 'b'\]"):
        run(OmegaConf.merge(passkey_cfg, {"model_names": ["c"]}), load_model=_must_not_load)

    cfg = OmegaConf.merge(
        passkey_cfg,
        {"model_names": ["b"], "needle_kind": "multi", "context_lengths": [512], "depths": [0.5], "trials_per_cell": 2},
    )
    report = json.loads(run(cfg)["json"].read_text())
    (model,) = report["models"]
    assert model["name"] == "b"
    trials, (row,) = model["trials"], model["lengths"]
    assert all(t["distractors"] for t in trials)
    expected = sum(t["extracted"] in t["distractors"] for t in trials)
    assert row["distractor_answers"] == expected
    assert row["decoy_answers"] == sum(t["extracted"] in t["decoys"] for t in trials)

    # runs of single models (one process each on a shared GPU) merge into one compare report
    other = run(OmegaConf.merge(cfg, {"model_names": ["a"], "output_dir": str(Path(cfg.output_dir) / "a")}))
    merged = Path(cfg.output_dir) / "merged"
    report_main(["merge", str(merged), str(Path(cfg.output_dir)), str(other["json"])])
    report = json.loads((merged / "results.json").read_text())
    assert [m["name"] for m in report["models"]] == ["b", "a"]
    assert report["models"][0] == model
    assert len(report["config"]["merged_from"]) == 2
    assert re.search(r"^\s*context\s+b\s+a$", (merged / "summary.txt").read_text(), re.M)  # the compare table
    with pytest.raises(ValueError, match="model 'b' appears twice"):
        merge_reports([Path(cfg.output_dir), Path(cfg.output_dir)], merged)


def test_a_stopped_run_resumes_from_its_journal_and_equals_an_uninterrupted_one(passkey_cfg):
    """Every finished trial is journaled (``trials.jsonl``); the same command runs only the missing trials (a
    half-written last line is ignored), and ``resume=False`` runs them all again."""
    calls = []

    def counting(entry):
        model = load_checkpointed_model(entry, torch.device("cpu"), torch.float32, passkey_cfg.output_dir)
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    full = json.loads(run(passkey_cfg, load_model=counting)["json"].read_text())
    forwards_per_run = len(calls)
    journal = Path(passkey_cfg.output_dir) / "trials.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == len(full["models"][0]["trials"]) == 8

    journal.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # stopped while writing the sixth trial
    # the stopped run's report: the five finished trials, cells counting what finished
    stopped_dir = Path(passkey_cfg.output_dir) / "stopped"
    report_main(["journal", str(stopped_dir), str(journal), "--name", "stopped"])
    (stopped,) = json.loads((stopped_dir / "results.json").read_text())["models"]
    assert stopped["name"] == "stopped"
    assert stopped["trials"] == full["models"][0]["trials"][:5]
    assert sum(c["trials"] for c in stopped["cells"]) == 5
    assert [r["kv_cache_bytes"] for r in stopped["lengths"]] == [
        r["kv_cache_bytes"] for r in full["models"][0]["lengths"]
    ]
    assert [r["trials"] for r in stopped["lengths"]] == [4, 1]
    assert re.search(r"@\s+512 tokens: accuracy \S+ \([01]/1\)", (stopped_dir / "summary.txt").read_text())
    calls.clear()
    resumed = json.loads(run(passkey_cfg, load_model=counting)["json"].read_text())
    assert 0 < len(calls) < forwards_per_run  # only the three missing trials ran
    (model,), (expected,) = resumed["models"], full["models"]
    assert model["trials"] == expected["trials"]
    assert model["cells"] == expected["cells"]
    assert [r["kv_cache_bytes"] for r in model["lengths"]] == [r["kv_cache_bytes"] for r in expected["lengths"]]

    calls.clear()
    run(passkey_cfg, load_model=counting)  # everything journaled: no forward at all
    assert calls == []
    run(OmegaConf.merge(passkey_cfg, {"resume": False}), load_model=counting)
    assert len(calls) == forwards_per_run
    # another model (or other decoding settings) never reuses these trials
    calls.clear()
    run(OmegaConf.merge(passkey_cfg, {"max_new_tokens": SMALL_GRID["max_new_tokens"] + 1}), load_model=counting)
    assert len(calls) > 0
    with pytest.raises(
        ValueError, match=r"holds trials of 2 models: \w+ \(mla_tiny\), \w+ \(mla_tiny\); choose one with --fingerprint"
    ):
        journal_result(journal, "either")
    first = json.loads(journal.read_text().splitlines()[0])
    model = journal_result(journal, fingerprint=first["fingerprint"])
    assert model["trials"] == full["models"][0]["trials"]  # the resumed run's rerun trials count once
    assert model["name"] == full["models"][0]["name"] == first["name"]  # the journaled name is the default
    with pytest.raises(ValueError, match="has no trials of model 'feedface'; it holds .* \\(") as error:
        journal_result(journal, fingerprint="feedface")
    assert first["name"] in str(error.value)
    empty = Path(passkey_cfg.output_dir) / "empty.jsonl"
    empty.write_text(lines[0][:40])  # only a line cut off mid-write
    with pytest.raises(ValueError, match="holds no finished trial"):
        journal_result(empty)
    with pytest.raises(SystemExit):  # the CLI: one line naming the problem, no traceback
        report_main(["journal", str(stopped_dir), str(Path(passkey_cfg.output_dir) / "missing.jsonl")])
    # nor do retrained weights written into the same checkpoint directory
    calls.clear()
    weights = next(Path(passkey_cfg.checkpointer.checkpoint_dir).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    run(passkey_cfg, load_model=counting)
    assert len(calls) == forwards_per_run


def test_one_models_runs_split_by_length_report_as_that_model(passkey_cfg):
    """One model evaluated by two runs (one length each, each its own output_dir, as on a shared GPU): the runs
    share the model's fingerprint and ``report journal`` over both journals equals the run over both lengths."""
    full = json.loads(run(passkey_cfg)["json"].read_text())["models"][0]
    root = Path(passkey_cfg.output_dir)
    journals = []
    for length in SMALL_GRID["context_lengths"]:
        part = OmegaConf.merge(passkey_cfg, {"context_lengths": [length], "output_dir": str(root / f"only_{length}")})
        run(part)
        journals.append(root / f"only_{length}" / "trials.jsonl")
    fingerprints = {json.loads(line)["fingerprint"] for j in journals for line in j.read_text().splitlines()}
    assert len(fingerprints) == 1
    assert fingerprints == {json.loads((root / "trials.jsonl").read_text().splitlines()[0])["fingerprint"]}
    report_main(["journal", str(root / "joined"), *map(str, journals)])
    (joined,) = json.loads((root / "joined" / "results.json").read_text())["models"]
    assert joined["trials"] == full["trials"]
    assert joined["cells"] == full["cells"]
    assert [r["accuracy"] for r in joined["lengths"]] == [r["accuracy"] for r in full["lengths"]]


def test_the_output_dir_is_part_of_the_fingerprint_only_when_the_checkpointer_reads_it(passkey_cfg):
    """A resuming checkpointer loads the newest epoch under output_dir: there another output_dir is another model."""
    from mla_components.evaluation.passkey import model_entries, model_fingerprint

    def fingerprint(**checkpointer):
        cfg = OmegaConf.merge(passkey_cfg, {"checkpointer": checkpointer})
        return model_fingerprint(model_entries(cfg)[0], cfg)

    assert fingerprint(output_dir="/tmp/a") == fingerprint(output_dir="/tmp/b")
    assert fingerprint(output_dir="/tmp/a", resume_from_checkpoint=True) != fingerprint(
        output_dir="/tmp/b", resume_from_checkpoint=True
    )
    assert fingerprint(output_dir="/tmp/a") != fingerprint(output_dir="/tmp/a", checkpoint_files=["other.safetensors"])
