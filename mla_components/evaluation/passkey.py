"""Passkey / needle-in-a-haystack evaluation over a grid of context lengths x needle depths.

The recipe ``mla_recipes/passkey_eval.py`` is a thin shell around :func:`run`; the main job and tests call it too.
Order of work (every config error surfaces before any weights are read):

1. validate the scalar fields (:class:`PasskeyGrid`);
2. build each model on the meta device to learn its ``max_seq_len``, and check each checkpoint directory exists;
3. generate every prompt (the training data's haystack code, ``split="eval"``) and check that prompt + new tokens fit
   each model;
4. per model: load weights, then per context length set up one KV cache of ``longest prompt + max_new_tokens``
   tokens and run :func:`~mla_components.decoding.chunked_prefill_greedy` for every trial of the row;
5. score (:mod:`~mla_components.evaluation.scoring`) and write the report (:mod:`~mla_components.evaluation.report`).

Every finished trial is appended to ``output_dir/trials.jsonl`` (one line, flushed) with a fingerprint of what
produced it (model, checkpoint, dtype, decoding and prompt settings). A run that is stopped (a time limit, a lost
machine) keeps what it measured, and the same command resumes: trials already in the journal with the same
fingerprint are not run again (``resume: False`` re-runs everything).

Each trial's needle comes from its own seed, derived from ``seed``, the length, the depth and the trial index, so
runs are reproducible and every model of a compare run sees the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules.common_utils import local_kv_cache
from tqdm import tqdm

from mla_components._validation import check_positive_int, check_selected_names, is_positive_int
from mla_components.decoding import CudaGraphStep, chunked_prefill_greedy
from mla_components.evaluation.judge import needle_excerpt
from mla_components.evaluation.report import (
    ModelResult,
    journal_key,
    journal_record_key,
    read_journal,
    write_report,
)
from mla_components.evaluation.scoring import extract_value, is_correct
from mla_components.kv_cache_report import allocated_kv_cache_bytes

PROMPT_FORMATS = ("chat", "landmark")


@dataclass(frozen=True)
class PasskeyGrid:
    """The evaluation grid and decoding settings, validated at construction.

    Args:
        context_lengths: haystack sizes in tokens (the prompt is about this long).
        depths: needle positions as fractions of the context, each in [0, 1].
        trials_per_cell: fresh needles per (length, depth).
        first_trial: index of the first of them: trials ``first_trial .. first_trial + trials_per_cell - 1`` of each
            cell, so one grid can be split over processes (e.g. one 1M-token prompt per GPU) with the prompts of
            the whole run.
        needle_kind: ``kind`` of ``make_needle_sample`` (``passkey`` by default).
        seed: base seed of every trial's needle.
        max_new_tokens: greedy tokens generated per trial.
        prefill_chunk: prompt tokens per prefill forward pass.
        prompt_format: ``chat`` (the project's haystack generator, eval split, in the model's chat template) or
            ``landmark`` (the standard Landmark-Attention passkey prompt, plain text; ``needle_kind`` passkey).
        cuda_graph: on CUDA, replay each decode step from a CUDA graph (one capture per context length); False
            launches them eagerly. The same tokens either way.

    Raises:
        ValueError: naming the field, for an empty or non-positive length list, a depth outside [0, 1], or a
            non-positive count.
    """

    context_lengths: tuple[int, ...]
    depths: tuple[float, ...]
    trials_per_cell: int
    first_trial: int = 0
    needle_kind: str = "passkey"
    seed: int = 0
    max_new_tokens: int = 16
    prefill_chunk: int = 512
    prompt_format: str = "chat"
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.prompt_format == "landmark" and self.needle_kind != "passkey":
            raise ValueError(
                f"prompt_format=landmark asks for a pass key: needle_kind must be passkey, got {self.needle_kind!r}"
            )
        if not self.context_lengths or any(not is_positive_int(n) for n in self.context_lengths):
            raise ValueError(
                f"context_lengths must be a non-empty list of positive integers, got {self.context_lengths}"
            )
        if len(set(self.context_lengths)) != len(self.context_lengths):
            raise ValueError(f"context_lengths has duplicates: {self.context_lengths}")
        if not self.depths or any(not 0.0 <= float(d) <= 1.0 for d in self.depths):
            raise ValueError(
                f"depths must be a non-empty list of fractions in [0, 1] (0 = needle at the start, 1 = at the "
                f"end), got {self.depths}"
            )
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths has duplicates: {self.depths}")
        for name in ("trials_per_cell", "max_new_tokens", "prefill_chunk"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.first_trial, int) or isinstance(self.first_trial, bool) or self.first_trial < 0:
            raise ValueError(f"first_trial must be an integer >= 0 (default 0), got {self.first_trial!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be true or false, got {self.cuda_graph!r}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PasskeyGrid:
        missing = [k for k in ("context_lengths", "depths", "trials_per_cell") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config is missing {missing} (e.g. context_lengths: [1024, 4096], depths: [0, 0.5, 1])")
        return cls(
            context_lengths=tuple(int(n) for n in cfg.context_lengths),
            depths=tuple(float(d) for d in cfg.depths),
            trials_per_cell=int(cfg.trials_per_cell),
            first_trial=cfg.get("first_trial", 0),
            needle_kind=str(cfg.get("needle_kind", "passkey")),
            seed=int(cfg.get("seed", 0)),
            max_new_tokens=int(cfg.get("max_new_tokens", 16)),
            prefill_chunk=int(cfg.get("prefill_chunk", 512)),
            prompt_format=str(cfg.get("prompt_format", "chat")),
            cuda_graph=cfg.get("cuda_graph", True),
        )


def trial_seed(seed: int, context_tokens: int, depth: float, trial: int) -> int:
    """A 31-bit seed per trial, independent across cells (no overlap between neighbouring cells' seeds)."""
    digest = hashlib.sha256(f"passkey_eval/{seed}/{context_tokens}/{depth!r}/{trial}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


@dataclass
class Trial:
    """One prompt of the grid, before any model has seen it."""

    context_tokens: int
    depth: float
    trial: int
    seed: int
    prompt: list[int]
    sample: Any  # NeedleSample

    def record(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "depth": self.depth,
            "trial": self.trial,
            "seed": self.seed,
            "kind": self.sample.kind,
            "prompt_tokens": len(self.prompt),
            "answer": self.sample.answer,
            "question": self.sample.question,
            "distractors": list(self.sample.distractors),
            "decoys": list(self.sample.decoys),
            "needle_excerpt": needle_excerpt(self.sample.context, self.sample.answer),
        }


def make_trials(tokenizer: Any, grid: PasskeyGrid) -> list[Trial]:
    """Every prompt of the grid, in (length, depth, trial) order, from the training data's haystack code with the
    evaluation split (templates and seeds disjoint from training), or the standard Landmark prompt."""
    from mla_components.data import make_needle_sample, needle_prompt_tokens
    from mla_components.evaluation.landmark import landmark_sample

    trials = []
    for length in grid.context_lengths:
        for depth in grid.depths:
            for index in range(grid.first_trial, grid.first_trial + grid.trials_per_cell):
                seed = trial_seed(grid.seed, length, depth, index)
                if grid.prompt_format == "landmark":
                    prompt, sample = landmark_sample(tokenizer, context_tokens=length, depth=depth, seed=seed)
                    trials.append(Trial(length, depth, index, seed, prompt, sample))
                    continue
                sample = make_needle_sample(
                    tokenizer, context_tokens=length, depth=depth, kind=grid.needle_kind, seed=seed, split="eval"
                )
                trials.append(Trial(length, depth, index, seed, list(needle_prompt_tokens(tokenizer, sample)), sample))
    return trials


def lm_eval_documents(
    context_lengths: Sequence[int], depths: Sequence[float], trials_per_cell: int, kind: str = "passkey", seed: int = 0
) -> list[dict[str, Any]]:
    """Documents of the ``mla_passkey`` lm-eval task: the recipe's prompts (same seeds) as plain text.

    Torchtune 0.6.1's ``eleuther_eval`` encodes the harness' text without a chat template, so the prompt is the
    user turn's text (context, blank line, question) followed by ``Answer:``; lengths are in byte-tokenizer tokens.
    """
    from mla_components.data import byte_tokenizer

    grid = PasskeyGrid(
        context_lengths=tuple(int(n) for n in context_lengths),
        depths=tuple(float(d) for d in depths),
        trials_per_cell=int(trials_per_cell),
        needle_kind=kind,
        seed=int(seed),
    )
    return [
        {
            "prompt": f"{t.sample.prompt}\nAnswer:",
            "answer": t.sample.answer,
            "context_tokens": t.context_tokens,
            "depth": t.depth,
            "trial": t.trial,
        }
        for t in make_trials(byte_tokenizer(), grid)
    ]


@dataclass
class ModelEntry:
    """One model to evaluate: a label, its builder config and its checkpointer config."""

    name: str
    model_cfg: DictConfig
    checkpointer_cfg: DictConfig
    field: str  # where it came from in the config, for error messages


def model_entries(cfg: DictConfig) -> list[ModelEntry]:
    """``checkpointer`` is one checkpointer (single mode) or a list of ``{name, checkpointer, model?}`` (compare
    mode; ``model`` defaults to the top-level one)."""
    if cfg.get("checkpointer") is None:
        raise ValueError("config has no checkpointer (an AtomicHFCheckpointer, or a list of them for compare mode)")
    if cfg.get("model") is None:
        raise ValueError("config has no model (e.g. model: {_component_: mla_components.models.mla_tiny})")
    if isinstance(cfg.checkpointer, ListConfig):
        entries = []
        for i, item in enumerate(cfg.checkpointer):
            field = f"checkpointer[{i}]"
            if not isinstance(item, DictConfig) or item.get("checkpointer") is None or not item.get("name"):
                raise ValueError(f"{field} must be {{name: ..., checkpointer: {{_component_: ...}}, model: optional}}")
            entries.append(ModelEntry(str(item.name), item.get("model") or cfg.model, item.checkpointer, field))
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpointer[*].name must be unique, got {names}")
        if not entries:
            raise ValueError("checkpointer is an empty list")
        selected = cfg.get("model_names")  # a subset by name, e.g. model_names=[mla_sft,mla_dpo] on the command line
        if selected is not None:
            keep = check_selected_names(selected, names)
            entries = [e for e in entries if e.name in keep]
        return entries
    name = cfg.get("name") or Path(str(cfg.checkpointer.get("checkpoint_dir", "model"))).name
    return [ModelEntry(str(name), cfg.model, cfg.checkpointer, "checkpointer")]


def check_checkpoint(entry: ModelEntry) -> None:
    """Fail before loading anything if the checkpoint directory is absent (unless the checkpointer will write a
    fresh init there)."""
    directory = entry.checkpointer_cfg.get("checkpoint_dir")
    if directory is None:
        raise ValueError(f"{entry.field}.checkpoint_dir is not set")
    if entry.checkpointer_cfg.get("init_model") is None and not (Path(str(directory)) / "config.json").is_file():
        raise FileNotFoundError(
            f"{entry.field}.checkpoint_dir={directory} holds no HF checkpoint (config.json); point it at a trained "
            "epoch_N directory or write one with `python -m mla_components.checkpointing.init`"
        )


def model_max_seq_len(model_cfg: DictConfig) -> int:
    """``max_seq_len`` of the model a config builds, from a meta-device build (no memory, no weights)."""
    with torch.device("meta"):
        model = config.instantiate(model_cfg)
    return int(model.max_seq_len)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux reports KiB


def decode_generated(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode generated ids, writing U+FFFD for ids past the tokenizer's vocabulary (an undertrained model can pick
    the padded rows of its embedding, e.g. ids 262-511 of mla_tiny's 512 with the byte tokenizer)."""
    vocab = tokenizer.vocab_size
    parts, known = [], []
    for token in ids:
        if token < vocab:
            known.append(token)
            continue
        parts += [tokenizer.decode(known), "\ufffd"]
        known = []
    parts.append(tokenizer.decode(known))
    return "".join(parts)


class TrialJournal:
    """Finished trials of an output directory, one JSON line each (``trials.jsonl``), keyed by model fingerprint,
    length, depth, trial index, seed, answer and prompt length (a changed prompt generator is another trial). A
    partly written last line (the process killed mid-write) is ignored."""

    def __init__(self, path: Path, resume: bool = True) -> None:
        self.path = Path(path)
        self.done: dict[tuple, dict[str, Any]] = {}
        if resume and self.path.is_file():
            for entry in read_journal(self.path):
                self.done[journal_record_key(entry["fingerprint"], entry["record"])] = entry
        elif self.path.exists():
            self.path.unlink()

    def get(self, fingerprint: str, trial: Trial) -> dict[str, Any] | None:
        cell = trial.context_tokens, trial.depth, trial.trial, trial.seed
        return self.done.get(journal_key(fingerprint, *cell, trial.sample.answer, len(trial.prompt)))

    def add(self, fingerprint: str, record: dict[str, Any], **measured: Any) -> None:
        entry = {"fingerprint": fingerprint, "record": record, **measured}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")  # end a line cut off mid-write before adding one
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[journal_record_key(fingerprint, record)] = entry


def model_fingerprint(entry: ModelEntry, cfg: DictConfig) -> str:
    """What a trial's result depends on besides its prompt: the model and its weights, dtype and decoding."""
    keys = ("dtype", "max_new_tokens", "prefill_chunk", "prompt_format", "needle_kind", "seed", "tokenizer")
    directory = Path(str(entry.checkpointer_cfg.get("checkpoint_dir")))
    weights = sorted(  # rewritten weights (a retrained checkpoint in the same directory) are another model
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.glob("*")
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json")
    )
    settings = {k: cfg.get(k) for k in keys}
    checkpointer = OmegaConf.to_container(entry.checkpointer_cfg, resolve=True)
    # output_dir is where nothing is read (a run split over output dirs is still one model), unless the checkpointer
    # resumes: then it loads the newest epoch under output_dir
    resuming = ("resume_from_checkpoint", "should_load_recipe_state", "recipe_checkpoint")
    if not any(checkpointer.get(k) for k in resuming):
        checkpointer.pop("output_dir", None)
    what = {
        "name": entry.name,
        "weights": weights,
        "model": OmegaConf.to_container(entry.model_cfg, resolve=True),
        "checkpointer": checkpointer,
        **{k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in settings.items()},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    trials: Sequence[Trial],
    grid: PasskeyGrid,
    *,
    name: str,
    checkpoint: str,
    device: torch.device,
    cache_dtype: torch.dtype,
    progress: bool = True,
    journal: TrialJournal | None = None,
    fingerprint: str = "",
) -> ModelResult:
    """Run every trial through ``model`` and score it; one KV cache per context length, reset between trials.
    Trials found in ``journal`` under ``fingerprint`` are taken from it (with their time, cache bytes and peak
    memory); the others are run and appended to it."""
    mla_config = getattr(model, "mla_config", None)
    result = ModelResult(name=name, checkpoint=checkpoint, kv_cache_dtype=getattr(mla_config, "kv_cache_dtype", None))
    cells = tqdm(total=len(grid.context_lengths) * len(grid.depths), desc=f"passkey {name}", disable=not progress)
    for length in grid.context_lengths:
        row = [t for t in trials if t.context_tokens == length]
        journaled = {id(t): journal.get(fingerprint, t) for t in row} if journal is not None else {}
        result.seconds[length] = 0.0
        for entry in filter(None, journaled.values()):
            result.seconds[length] += entry["seconds"]
            result.kv_cache_bytes[length] = entry["kv_cache_bytes"]
            if entry.get("peak_memory_bytes") is not None:
                peak = max(result.peak_memory_by_length.get(length, 0), entry["peak_memory_bytes"])
                result.peak_memory_by_length[length] = peak
        if all(journaled.get(id(t)) for t in row):
            result.trials.extend(journaled[id(t)]["record"] for t in row)
            cells.update(len(grid.depths))
            continue
        cache_len = max(len(t.prompt) for t in row) + grid.max_new_tokens
        if device.type == "cuda":  # per length; the model's overall peak is the largest of them
            torch.cuda.reset_peak_memory_stats(device)
        with local_kv_cache(model, batch_size=1, device=device, dtype=cache_dtype, decoder_max_seq_len=cache_len):
            result.kv_cache_bytes[length] = allocated_kv_cache_bytes(model)
            step = CudaGraphStep(model, grid.cuda_graph)  # one capture serves every trial of this cache
            for depth in grid.depths:
                for trial in (t for t in row if t.depth == depth):
                    if journaled.get(id(trial)):
                        result.trials.append(journaled[id(trial)]["record"])
                        continue
                    start = time.perf_counter()
                    ids = chunked_prefill_greedy(
                        model,
                        trial.prompt,
                        grid.max_new_tokens,
                        prefill_chunk=grid.prefill_chunk,
                        stop_tokens=list(tokenizer.stop_tokens),
                        step=step,
                    )
                    generated = decode_generated(tokenizer, ids)
                    record = trial.record()
                    record.update(
                        generated=generated,
                        extracted=extract_value(generated),
                        correct=is_correct(generated, trial.sample.answer),
                    )
                    seconds = time.perf_counter() - start
                    result.seconds[length] += seconds
                    result.trials.append(record)
                    if journal is not None:
                        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                        journal.add(
                            fingerprint,
                            record,
                            name=name,
                            kv_cache_dtype=result.kv_cache_dtype,
                            seconds=seconds,
                            kv_cache_bytes=result.kv_cache_bytes[length],
                            peak_memory_bytes=peak,
                        )
                cells.update(1)
        if device.type == "cuda":
            peak = max(result.peak_memory_by_length.get(length, 0), torch.cuda.max_memory_allocated(device))
            result.peak_memory_by_length[length] = peak
    cells.close()
    result.peak_memory_bytes, result.peak_memory_kind = peak_memory(device)
    if result.peak_memory_by_length:
        result.peak_memory_bytes = max(result.peak_memory_by_length.values())
    return result


def run(cfg: DictConfig, load_model: Callable[[ModelEntry], torch.nn.Module] | None = None) -> dict[str, Path]:
    """The whole evaluation of a recipe config; returns the report's paths.

    Args:
        cfg: the recipe config (see ``configs/mla_tiny/passkey_eval.yaml``).
        load_model: builds and loads the model of an entry; default: ``config.instantiate(model)`` on
            ``device``/``dtype`` with the checkpointer's weights. Tests pass a stub model here.
    """
    log = utils.get_logger("INFO")
    grid = PasskeyGrid.from_config(cfg)
    if not cfg.get("output_dir"):
        raise ValueError("output_dir is not set")
    entries = model_entries(cfg)
    for entry in entries:
        check_checkpoint(entry)
    max_lens = {entry.name: model_max_seq_len(entry.model_cfg) for entry in entries}
    for entry in entries:  # the cheap check first: a grid length that cannot fit at all
        too_long = [n for n in grid.context_lengths if n + grid.max_new_tokens > max_lens[entry.name]]
        if too_long:
            raise ValueError(
                f"context_lengths {too_long} + max_new_tokens ({grid.max_new_tokens}) exceed {entry.name}'s "
                f"max_seq_len ({max_lens[entry.name]}); drop them or build the model with a larger max_seq_len"
            )

    tokenizer = config.instantiate(cfg.tokenizer)
    trials = make_trials(tokenizer, grid)
    longest = max(len(t.prompt) for t in trials) + grid.max_new_tokens
    for entry in entries:
        if longest > max_lens[entry.name]:
            raise ValueError(
                f"the longest prompt ({longest - grid.max_new_tokens} tokens) + max_new_tokens exceeds {entry.name}'s "
                f"max_seq_len ({max_lens[entry.name]}); lower the largest of context_lengths"
            )

    judge = None
    if cfg.get("judge") is not None:  # a wrong URL or model fails now, not after the whole evaluation
        from mla_components.evaluation.judge import build_judge

        judge = build_judge(OmegaConf.to_container(cfg.judge, resolve=True))
        judge.check_endpoint()

    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    load_model = load_model or (lambda entry: load_checkpointed_model(entry, device, dtype, cfg.output_dir))
    journal = TrialJournal(Path(cfg.output_dir) / "trials.jsonl", resume=bool(cfg.get("resume", True)))
    results = []
    for entry in entries:
        fingerprint = model_fingerprint(entry, cfg)
        resumed = sum(journal.get(fingerprint, t) is not None for t in trials)
        model = load_model(entry).eval()
        log.info(
            "%s: %d trials over %d cells%s",
            entry.name,
            len(trials),
            len(grid.context_lengths) * len(grid.depths),
            f"; {resumed} taken from {journal.path} (resume=False re-runs them)" if resumed else "",
        )
        result = evaluate_model(
            model,
            tokenizer,
            trials,
            grid,
            name=entry.name,
            checkpoint=str(entry.checkpointer_cfg.get("checkpoint_dir")),
            device=device,
            cache_dtype=dtype,
            progress=bool(cfg.get("progress", True)),
            journal=journal,
            fingerprint=fingerprint,
        )
        results.append(result.to_dict())
        del model
    report_config = OmegaConf.to_container(cfg, resolve=True)
    paths = write_report(Path(cfg.output_dir), report_config, results)
    log.info("\n" + paths["summary"].read_text())
    log.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    if judge is not None:
        from mla_components.evaluation.judge import judge_results

        judge_results(cfg.output_dir, judge)
    return paths


def packaged_config(name: str = "mla_tiny/passkey_eval.yaml") -> DictConfig:
    """A config shipped in ``mla_recipes.configs`` (the repository's ``configs/``), from any working directory."""
    from importlib.resources import files

    return OmegaConf.create(files("mla_recipes.configs").joinpath(name).read_text())


def evaluate_checkpoints(
    checkpoints: Mapping[str, str | Path],
    output_dir: str | Path,
    config: str = "mla_tiny/passkey_eval.yaml",
    **overrides: Any,
) -> dict[str, Path]:
    """Run a shipped passkey config on named checkpoint directories, side by side in one report (compare mode),
    e.g. ``{"sft": ..., "dpo": ...}`` (the main job's last step). Each uses the config's model and checkpointer;
    ``overrides`` replace config fields, e.g. ``context_lengths=[512, 1024]``."""
    if not checkpoints:
        raise ValueError("checkpoints is empty: give {name: checkpoint_dir}")
    cfg = packaged_config(config)
    template = cfg.checkpointer
    cfg.checkpointer = [
        {"name": name, "checkpointer": OmegaConf.merge(template, {"checkpoint_dir": str(directory)})}
        for name, directory in checkpoints.items()
    ]
    cfg.output_dir = str(output_dir)
    return run(OmegaConf.merge(cfg, overrides))


def load_checkpointed_model(
    entry: ModelEntry, device: torch.device, dtype: torch.dtype, output_dir: str | Path
) -> torch.nn.Module:
    """Instantiate the entry's checkpointer and model, and load the weights (as Torchtune's recipes do)."""
    checkpointer_cfg = entry.checkpointer_cfg.copy()
    if checkpointer_cfg.get("output_dir") is None:  # required by the checkpointer; nothing is saved during eval
        checkpointer_cfg.output_dir = str(output_dir)
    checkpointer = config.instantiate(checkpointer_cfg)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(entry.model_cfg)
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model
