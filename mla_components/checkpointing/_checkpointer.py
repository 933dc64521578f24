"""A Torchtune checkpointer that reads and writes HF directories atomically and resumes from the newest one.

Torchtune's ``FullModelHFCheckpointer`` cannot map MLA weights (its model types are a closed enum and unknown keys
raise), writes recipe state separately from the weights, and writes in place. This one keeps Torchtune's
checkpointer interface (``load_checkpoint()``, ``save_checkpoint(state_dict, epoch, intermediate_checkpoint)``,
``should_load_recipe_state``) so the built-in recipes use it unmodified via ``checkpointer._component_``.
"""

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torchtune import training
from torchtune.training.checkpointing._checkpointer import _CheckpointerInterface

from mla_components.checkpointing._hf_format import (
    load_hf_checkpoint,
    read_config,
    recover_interrupted_writes,
    write_hf_checkpoint,
)
from mla_components.checkpointing._lock import lock_output_dir
from mla_components.compat.torchtune import end_with_launcher

log = logging.getLogger(__name__)

RECIPE_STATE = "recipe_state"  # saved as recipe_state.pt inside an intermediate epoch directory
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def epoch_dirs(output_dir: str | Path, *, resumable: bool) -> list[tuple[int, Path]]:
    """Complete ``epoch_N`` directories of ``output_dir`` sorted by N; with ``resumable`` only those holding recipe
    state (intermediate checkpoints)."""
    found = []
    for path in Path(output_dir).glob("epoch_*"):
        match = _EPOCH_DIR.match(path.name)
        if match and (path / "config.json").is_file() and (not resumable or (path / f"{RECIPE_STATE}.pt").is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_resumable_epoch(output_dir: str | Path) -> Path | None:
    """The newest complete ``epoch_N`` directory holding recipe state, or None (also used by the SLURM templates'
    requeue logic)."""
    found = epoch_dirs(output_dir, resumable=True)
    return found[-1][1] if found else None


def _on_rank_zero(action: Callable[[], None], what: str) -> None:
    """Run ``action`` on rank 0 only. In a distributed run every rank then takes part in the same collective,
    and a failure on rank 0 is raised on every rank instead of leaving the others waiting."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    error = None
    if rank == 0:
        try:
            action()
        except Exception as e:
            if not distributed:
                raise
            error = e
    if distributed:
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 could not {what}: {outcome[0]}")


def _ensure_initial_checkpoint(builder: str, directory: Path, seed: int, tokenizer_dir: str | None) -> None:
    """Write a freshly initialised ``builder`` to ``directory`` unless it already holds a checkpoint (rank 0 looks
    and writes, atomically)."""
    from mla_components.checkpointing.init import write_initial_checkpoint  # imports the builders lazily

    def write() -> None:
        if not (directory / "config.json").is_file():
            log.info("checkpoint_dir %s is empty: writing a fresh %s (seed %d)", directory, builder, seed)
            write_initial_checkpoint(builder, directory, seed=seed, tokenizer_dir=tokenizer_dir)

    _on_rank_zero(write, f"write the initial checkpoint to {directory}")


class AtomicHFCheckpointer(_CheckpointerInterface):
    """Load an HF model directory; save ``output_dir/epoch_{N}/`` as a complete HF directory, atomically.

    Each ``epoch_N`` directory is loadable by transformers (and served by vLLM for MLA): ``config.json``,
    ``model.safetensors``, tokenizer and generation files. Intermediate epochs also hold ``recipe_state.pt``
    (optimizer, seed, epochs run, data-loader position) in the *same* directory, so weights and training state
    can never disagree. With ``should_load_recipe_state`` the newest such directory is loaded instead of
    ``checkpoint_dir``.

    Args:
        checkpoint_dir (str): HF directory to start from (``deepseek_v3`` MLA, or ``llama`` for the GQA control).
        output_dir (str): where ``epoch_N`` directories go; must not be inside ``checkpoint_dir``. One run at a
            time: rank 0 holds its lock (``.mla_components.lock``) and a second run or resume is refused.
        checkpoint_files (Optional[list[str]]): weight files to read; default: all ``*.safetensors`` (or the index).
        model_type (Optional[str]): accepted for config compatibility with Torchtune; the type is read from
            ``config.json``.
        recipe_checkpoint (Optional[str]): explicit ``recipe_state.pt`` to resume from (default: the newest).
        should_load_recipe_state (bool): resume; set by the recipes from ``resume_from_checkpoint``.
        resume_from_checkpoint (bool): deprecated Torchtune alias of ``should_load_recipe_state``.
        keep_last_n_intermediate (Optional[int]): delete older intermediate epoch directories beyond this many.
        init_model (Optional[str]): a builder (``mla_tiny``, ``gqa_1b`` or a dotted path). When ``checkpoint_dir``
            holds no ``config.json`` yet, a freshly initialised model is written there first (by rank 0; the other
            ranks wait), so training from scratch needs nothing but ``tune run``. An existing checkpoint is never
            overwritten.
        init_seed (int): seed of that initialisation.
        init_tokenizer_dir (Optional[str]): HF tokenizer files to ship with it (e.g. the Llama-3 tokenizer of the 1B
            configs); default: the built-in byte tokenizer.
        config_updates (Optional[dict]): ``config.json`` fields that the saved epochs change, for a model built
            differently from the checkpoint it started from, e.g. a context extension's ``rope_scaling`` and
            ``max_position_embeddings`` (give the same values to the ``model``, so saved files describe it).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: str,
        checkpoint_files: list[str] | None = None,
        model_type: str | None = None,
        recipe_checkpoint: str | None = None,
        should_load_recipe_state: bool = False,
        resume_from_checkpoint: bool = False,
        keep_last_n_intermediate: int | None = None,
        adapter_checkpoint: str | None = None,
        safe_serialization: bool = True,
        init_model: str | None = None,
        init_seed: int = 0,
        init_tokenizer_dir: str | None = None,
        config_updates: dict[str, Any] | None = None,
    ) -> None:
        if adapter_checkpoint is not None:
            raise ValueError("checkpointer.adapter_checkpoint: adapters are not supported by AtomicHFCheckpointer")
        end_with_launcher()  # every rank builds a checkpointer: none outlives a killed torchrun
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        if self._output_dir.resolve().is_relative_to(self._checkpoint_dir.resolve()):
            raise ValueError(
                f"checkpointer.output_dir ({output_dir}) must not be inside checkpointer.checkpoint_dir "
                f"({checkpoint_dir}): saved epochs would be read back as the base model"
            )
        self._checkpoint_files = list(checkpoint_files) if checkpoint_files else None
        self._should_load_recipe_state = should_load_recipe_state or resume_from_checkpoint
        self._keep_last_n = keep_last_n_intermediate
        # a YAML config may pass an OmegaConf node: plain containers serialise to JSON
        updates = config_updates or {}
        if OmegaConf.is_config(updates):
            updates = OmegaConf.to_container(updates, resolve=True)
        self._config_updates = updates
        if not isinstance(self._config_updates, dict):
            raise ValueError(
                f"checkpointer.config_updates must be a mapping of config.json fields, got {config_updates!r}"
            )
        if init_model is not None:
            _ensure_initial_checkpoint(init_model, self._checkpoint_dir, init_seed, init_tokenizer_dir)
        self._config = read_config(self._checkpoint_dir)  # fail fast, before any model is built
        _on_rank_zero(lambda: lock_output_dir(self._output_dir), f"lock output_dir {output_dir}")
        if self._output_dir.is_dir():  # a process killed mid-save: its previous epoch is restored
            recover_interrupted_writes(self._output_dir)
        self._resume_dir: Path | None = None
        if self._should_load_recipe_state:
            if recipe_checkpoint is not None:
                self._resume_dir = Path(recipe_checkpoint).parent
            else:
                self._resume_dir = latest_resumable_epoch(self._output_dir)
            if self._resume_dir is None or not (self._resume_dir / f"{RECIPE_STATE}.pt").is_file():
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self._output_dir} has no intermediate epoch_N directory "
                    "with recipe_state.pt; start without resume_from_checkpoint (or point output_dir at the run)"
                )
        self._output_dir.mkdir(parents=True, exist_ok=True)

    def load_checkpoint(self) -> dict[str, Any]:
        source = self._resume_dir or self._checkpoint_dir
        files = None if self._resume_dir else self._checkpoint_files
        # a weight-only quantised export is read dequantised: evaluating it measures the quantisation's quality cost
        config, model_state = load_hf_checkpoint(source, files, dequantize=True)
        state: dict[str, Any] = {training.MODEL_KEY: model_state}
        if self._resume_dir is not None:
            recipe_state = torch.load(self._resume_dir / f"{RECIPE_STATE}.pt", map_location="cpu", weights_only=False)
            state.update(recipe_state)
            log.info("Resuming from %s (epochs_run=%s)", self._resume_dir, recipe_state.get(training.EPOCHS_KEY))
        self._config = config
        return state

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        if adapter_only:
            raise ValueError("save_adapter_weights_only: adapters are not supported by AtomicHFCheckpointer")
        recipe_state = {k: v for k, v in state_dict.items() if k != training.MODEL_KEY}
        target = self._output_dir / f"epoch_{epoch}"
        write_hf_checkpoint(
            target,
            state_dict[training.MODEL_KEY],
            {**self._config, **self._config_updates},
            side_files_from=self._resume_dir or self._checkpoint_dir,
            extra={RECIPE_STATE: recipe_state} if intermediate_checkpoint else None,
        )
        log.info("Saved %s checkpoint to %s", "intermediate" if intermediate_checkpoint else "final", target)
        if intermediate_checkpoint and self._keep_last_n:
            self._prune(keep=self._keep_last_n)

    def _prune(self, keep: int) -> None:
        for _, path in epoch_dirs(self._output_dir, resumable=True)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
