"""Passkey/needle report: results JSON, per-trial and per-cell CSV, heatmap PNG (one panel per model), summaries.

The report is built from per-model result dicts (``ModelResult.to_dict()``), so a compare run (several checkpoints)
and a single run share one format. Files written into ``output_dir``:

- ``results.json``: the config, and per model the cells, per-length summaries, memory figures and every trial;
- ``trials.csv``: one row per trial (model, length, depth, trial, seed, prompt tokens, answer, extracted value,
  correct, generated text);
- ``cells.csv``: one row per (model, length, depth) with trials, correct, accuracy;
- ``heatmap.png``: accuracy over depth (rows) x context length (columns), one panel per model, shared 0-1 scale;
- ``summary.txt``: one line per (model, length) and, in compare mode, a table of accuracy per length and model.

A run that was stopped before its report (a time limit, a lost machine) leaves its journal (``trials.jsonl``, one
finished trial per line); ``python -m mla_components.evaluation.report journal`` reports what it holds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_components.evaluation.scoring import CellScore, aggregate_cells

RESULTS_FORMAT = "infinitecontext.passkey_eval/v1"
TRIAL_FIELDS = (
    "model",
    "context_tokens",
    "depth",
    "trial",
    "seed",
    "kind",
    "prompt_tokens",
    "answer",
    "extracted",
    "correct",
    "generated",
)
CELL_FIELDS = ("model", "context_tokens", "depth", "trials", "correct", "accuracy")


@dataclass
class ModelResult:
    """Everything measured for one model/checkpoint.

    Attributes:
        name: label in tables and heatmap titles.
        checkpoint: the checkpoint directory evaluated.
        trials: per-trial records (keys of ``TRIAL_FIELDS`` except ``model``).
        kv_cache_bytes: KV-cache bytes allocated per context length (cache sized for prompt + new tokens).
        seconds: time of the trials of each context length (prefill + decode; a resumed run adds the journaled ones).
        peak_memory_by_length: peak CUDA allocation while each context length ran (CUDA only).
        peak_memory_bytes: peak CUDA allocation, or the process's peak RSS on CPU.
        peak_memory_kind: ``"cuda_max_allocated"`` or ``"cpu_max_rss"``.
        kv_cache_dtype: an MLA model's ``kv_cache_dtype`` (``"bf16"`` or ``"fp8_e4m3"``); None for other models.
    """

    name: str
    checkpoint: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    kv_cache_bytes: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    peak_memory_by_length: dict[int, int] = field(default_factory=dict)
    peak_memory_bytes: int | None = 0
    peak_memory_kind: str | None = "cpu_max_rss"
    kv_cache_dtype: str | None = None

    def cells(self) -> list[CellScore]:
        return aggregate_cells(self.trials)

    def length_summaries(self) -> list[dict[str, Any]]:
        """Accuracy, mean prompt length, cache bytes and time per context length."""
        rows = []
        for length in sorted({int(t["context_tokens"]) for t in self.trials}):
            trials = [t for t in self.trials if int(t["context_tokens"]) == length]
            rows.append(
                {
                    "context_tokens": length,
                    "trials": len(trials),
                    "correct": sum(bool(t["correct"]) for t in trials),
                    "accuracy": sum(bool(t["correct"]) for t in trials) / len(trials),
                    "mean_prompt_tokens": sum(t["prompt_tokens"] for t in trials) / len(trials),
                    # answered with another planted value: a distractor needle's (multi) or a decoy's from the filler
                    "distractor_answers": sum(t.get("extracted") in (t.get("distractors") or ()) for t in trials),
                    "decoy_answers": sum(t.get("extracted") in (t.get("decoys") or ()) for t in trials),
                    "kv_cache_bytes": self.kv_cache_bytes.get(length),
                    "peak_memory_bytes": self.peak_memory_by_length.get(length),
                    "seconds": self.seconds.get(length),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        cells = self.cells()
        correct = sum(c.correct for c in cells)
        total = sum(c.trials for c in cells)
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "overall_accuracy": correct / total if total else 0.0,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "kv_cache_dtype": self.kv_cache_dtype,
            "lengths": self.length_summaries(),
            "cells": [{**vars(c), "accuracy": c.accuracy} for c in cells],
            "trials": self.trials,
        }


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def summary_lines(models: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (model, context length): accuracy, correct/trials, per-depth accuracies, cache, time."""
    lines = []
    for model in models:
        by_length: dict[int, list[dict]] = {}
        for cell in model["cells"]:
            by_length.setdefault(cell["context_tokens"], []).append(cell)
        for row in model["lengths"]:
            depths = " ".join(f"{c['depth']:.0%}:{c['accuracy']:.2f}" for c in by_length[row["context_tokens"]])
            seconds = "" if row["seconds"] is None else f" {row['seconds']:.1f}s"
            if row.get("peak_memory_bytes") is not None:
                seconds += f" peak {_mib(row['peak_memory_bytes'])}"
            if row.get("distractor_answers"):
                seconds += f" | distractor answers {row['distractor_answers']}/{row['trials']}"
            cache_dtype = " fp8_e4m3" if model.get("kv_cache_dtype") == "fp8_e4m3" else ""
            lines.append(
                f"{model['name']} @ {row['context_tokens']:>7,} tokens: accuracy {row['accuracy']:.3f} "
                f"({row['correct']}/{row['trials']}) | depth {depths} | KV cache {_mib(row['kv_cache_bytes'])}"
                f"{cache_dtype}{seconds}"
            )
    return lines


def compare_table(models: Sequence[dict[str, Any]]) -> str:
    """Accuracy per context length (rows) and model (columns), plus the overall accuracy and peak memory."""
    names = [m["name"] for m in models]
    width = max(12, *(len(n) for n in names))
    lengths = sorted({row["context_tokens"] for m in models for row in m["lengths"]})
    header = f"{'context':>9} " + " ".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for length in lengths:
        accs = []
        for m in models:
            row = next((r for r in m["lengths"] if r["context_tokens"] == length), None)
            accs.append("-" if row is None else f"{row['accuracy']:.3f}")
        lines.append(f"{length:>9,} " + " ".join(f"{a:>{width}}" for a in accs))
    lines.append(f"{'overall':>9} " + " ".join(f"{m['overall_accuracy']:>{width}.3f}" for m in models))
    lines.append(f"{'peak mem':>9} " + " ".join(f"{_mib(m['peak_memory_bytes']):>{width}}" for m in models))
    return "\n".join(lines)


def plot_heatmaps(models: Sequence[dict[str, Any]], path: Path, title: str = "Needle retrieval accuracy") -> Path:
    """Accuracy heatmaps, depth (rows, 0% at the top) x context length (columns), side by side, one per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1, len(models), figsize=(1.2 + 3.2 * len(models), 3.6), squeeze=False, constrained_layout=True
    )
    image = None
    for ax, model in zip(axes[0], models, strict=True):
        lengths = sorted({c["context_tokens"] for c in model["cells"]})
        depths = sorted({c["depth"] for c in model["cells"]})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in model["cells"]:
            grid[depths.index(c["depth"]), lengths.index(c["context_tokens"])] = c["accuracy"]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model['name']} (overall {model['overall_accuracy']:.2f})", fontsize=9)
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else f"{tokens:,}"


def write_report(output_dir: Path, config: dict[str, Any], models: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write ``results.json``, ``trials.csv``, ``cells.csv``, ``heatmap.png`` and ``summary.txt``.

    Returns:
        The paths written, by name.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "results.json",
        "trials_csv": output_dir / "trials.csv",
        "cells_csv": output_dir / "cells.csv",
        "heatmap": output_dir / "heatmap.png",
        "summary": output_dir / "summary.txt",
    }
    paths["json"].write_text(json.dumps({"format": RESULTS_FORMAT, "config": config, "models": list(models)}, indent=1))
    with paths["trials_csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_FIELDS)
        writer.writeheader()
        for model in models:
            for trial in model["trials"]:
                writer.writerow({"model": model["name"], **{k: trial.get(k) for k in TRIAL_FIELDS if k != "model"}})
    with paths["cells_csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CELL_FIELDS)
        writer.writeheader()
        for model in models:
            for cell in model["cells"]:
                writer.writerow({"model": model["name"], **{k: cell[k] for k in CELL_FIELDS if k != "model"}})
    plot_heatmaps(models, paths["heatmap"])
    text = summary_lines(models)
    if len(models) > 1:
        text += ["", compare_table(models)]
    paths["summary"].write_text("\n".join(text) + "\n")
    return paths


def load_results(path: Path) -> dict[str, Any]:
    """Read a ``results.json`` (or the directory holding one) written by :func:`write_report`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    if data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a passkey_eval results file (format {data.get('format')!r})")
    return data


def journal_key(fingerprint: str, context_tokens, depth, trial, seed, answer: str, prompt_tokens) -> tuple:
    """What identifies a journaled trial: the model's fingerprint, the cell, the seed and what the prompt came out
    as (its answer and length: a changed prompt generator is another trial)."""
    return fingerprint, int(context_tokens), float(depth), int(trial), seed, answer, int(prompt_tokens)


def journal_record_key(fingerprint: str, record: dict[str, Any]) -> tuple:
    fields = ("context_tokens", "depth", "trial", "seed", "answer", "prompt_tokens")
    return journal_key(fingerprint, *(record[name] for name in fields))


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The entries of a trial journal (``trials.jsonl``): ``{"fingerprint", "record", "seconds", "kv_cache_bytes",
    "peak_memory_bytes"}`` each (and the model's ``name`` and ``kv_cache_dtype``), in the order written. A partly
    written line (the process killed mid-write) is skipped."""
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "fingerprint" in entry and "record" in entry:
            entries.append(entry)
    return entries


def journal_result(
    path: Path | Sequence[Path], name: str | None = None, fingerprint: str | None = None
) -> dict[str, Any]:
    """One model's result dict (as :meth:`ModelResult.to_dict`) from the trials its journals hold: the report of a
    run stopped before it wrote one, or of one model's evaluation split over several runs (by length or depth, one
    process each). Cells hold the trials that finished (the summary's counts show how many); a trial journaled twice
    (a resumed run's rerun) counts once, its last entry.

    Args:
        path: the journal (``trials.jsonl``) or the output directory holding it; or several, read in order.
        name: the model's label in tables and heatmaps (default: the name journaled with the trials).
        fingerprint: which model, when the journals hold several (one run of several models, or rewritten weights).
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    paths = [p / "trials.jsonl" if p.is_dir() else p for p in paths]
    entries = []
    for one in paths:
        if not one.is_file():
            raise FileNotFoundError(f"{one}: no trial journal (a passkey run writes output_dir/trials.jsonl)")
        entries += read_journal(one)
    path = paths[0] if len(paths) == 1 else ", ".join(str(p) for p in paths)
    if not entries:
        raise ValueError(f"{path} holds no finished trial")
    models = {e["fingerprint"]: e.get("name") or "unnamed" for e in entries}
    listed = ", ".join(f"{fp} ({model})" for fp, model in models.items())
    if fingerprint is None:
        if len(models) != 1:
            raise ValueError(f"{path} holds trials of {len(models)} models: {listed}; choose one with --fingerprint")
        fingerprint = next(iter(models))
    elif fingerprint not in models:
        raise ValueError(f"{path} has no trials of model {fingerprint!r}; it holds {listed}")
    chosen = {journal_record_key(fingerprint, e["record"]): e for e in entries if e["fingerprint"] == fingerprint}
    first = next(iter(chosen.values()))
    result = ModelResult(
        name=name or first.get("name") or fingerprint,
        checkpoint=f"journal {path} ({fingerprint})",
        kv_cache_dtype=first.get("kv_cache_dtype"),
    )
    for entry in chosen.values():
        length = int(entry["record"]["context_tokens"])
        result.trials.append(entry["record"])
        result.seconds[length] = result.seconds.get(length, 0.0) + float(entry.get("seconds") or 0.0)
        if entry.get("kv_cache_bytes") is not None:
            result.kv_cache_bytes[length] = int(entry["kv_cache_bytes"])
        if entry.get("peak_memory_bytes") is not None:
            peak = max(result.peak_memory_by_length.get(length, 0), int(entry["peak_memory_bytes"]))
            result.peak_memory_by_length[length] = peak
    if result.peak_memory_by_length:  # CUDA peaks were journaled; a CPU run's peak RSS was not
        result.peak_memory_bytes, result.peak_memory_kind = (
            max(result.peak_memory_by_length.values()),
            "cuda_max_allocated",
        )
    else:
        result.peak_memory_bytes, result.peak_memory_kind = None, None
    return result.to_dict()


def merge_reports(sources: Sequence[Path], output_dir: Path) -> dict[str, Path]:
    """One compare report from several runs' ``results.json`` (e.g. one process per model on a shared GPU).

    The models keep their order; the first run's config is kept, with the sources listed under ``merged_from``.
    Two models of one name, or a file that is no passkey report, are refused.
    """
    if not sources:
        raise ValueError("merge needs at least one results.json (or a directory holding one)")
    runs = [load_results(Path(source)) for source in sources]
    models: list[dict[str, Any]] = []
    for source, run in zip(sources, runs, strict=True):
        for model in run["models"]:
            if any(seen["name"] == model["name"] for seen in models):
                raise ValueError(f"model {model['name']!r} appears twice (again in {source}); merge distinct runs")
            models.append(model)
    config = {**runs[0]["config"], "merged_from": [str(source) for source in sources]}
    return write_report(Path(output_dir), config, models)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mla_components.evaluation.report merge OUTPUT_DIR RUN_DIR...``: one report of several runs;
    ``... journal OUTPUT_DIR TRIALS_JSONL... [--name NAME]``: the report of a run stopped before it wrote one, or of
    one model's runs split by length or depth."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mla_components.evaluation.report", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge several passkey reports into one compare report")
    merge.add_argument("output_dir", type=Path)
    merge.add_argument("sources", type=Path, nargs="+", help="results.json files or the directories holding them")
    journal = commands.add_parser("journal", help="report the finished trials of one model's trials.jsonl files")
    journal.add_argument("output_dir", type=Path)
    journal.add_argument(
        "journal",
        type=Path,
        nargs="+",
        help="one model's trials.jsonl files (or output directories), of one or more runs",
    )
    journal.add_argument("--name", help="the model's label in the report (default: the journaled name)")
    journal.add_argument("--fingerprint", help="which model, when the journal holds several")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            paths = merge_reports(args.sources, args.output_dir)
        else:
            model = journal_result(args.journal, args.name, args.fingerprint)
            config = {
                "from_journal": [str(p) for p in args.journal],
                "note": "the finished trials of the journals: a stopped run, or one model's split runs",
            }
            paths = write_report(args.output_dir, config, [model])
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
