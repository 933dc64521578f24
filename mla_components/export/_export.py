"""Training checkpoint -> servable HF DeepseekV3 directory (validated, cast, optionally torchao-quantised)."""

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mla_components.checkpointing import epoch_dirs, load_hf_checkpoint, read_config
from mla_components.checkpointing._hf_format import DTYPES, tune_to_hf, write_hf_checkpoint, write_hf_directory
from mla_components.export._quantize import QUANTIZATIONS, quantization_config, quantize_weights
from mla_components.export._validate import TOKENIZER_FILES, ExportError, validate_serving_config

__all__ = ["DTYPES", "EXPORT_MARKER", "check_output", "export_checkpoint", "load_exported_checkpoint"]
EXPORT_MARKER = "mla_export.json"  # written into every export: what --overwrite may replace


def check_output(src: Path, dst: Path, *, overwrite: bool = False) -> None:
    """Refuse an export target that is not absent, empty or (with ``overwrite``) a previous export, or that is
    inside or above the source or the working directory; each message names the path and the fix."""
    src, dst = Path(src), Path(dst)
    where, source = dst.resolve(), src.resolve()
    if where == source:
        raise ExportError(f"--output {dst} must differ from --checkpoint (the export never overwrites its source)")
    if where.is_relative_to(source):
        raise ExportError(f"--output {dst} is inside --checkpoint {src}: choose a directory outside the checkpoint")
    if Path.cwd().resolve().is_relative_to(where):
        raise ExportError(
            f"--output {dst} is the working directory or above it: choose a new directory, e.g. --output exports/model"
        )
    if source.is_relative_to(where):
        raise ExportError(
            f"--output {dst} contains --checkpoint {src} and would replace it: choose a new directory for the export"
        )
    if dst.is_symlink():
        raise ExportError(f"--output {dst} is a symbolic link: give the directory it points to ({where})")
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"--output {dst} exists and is not a directory: choose an absent or empty directory")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not (dst / EXPORT_MARKER).is_file():
        raise ExportError(
            f"--output {dst} is not empty and holds no previous export (no {EXPORT_MARKER}): choose an absent or "
            "empty directory"
        )
    if not overwrite:
        raise ExportError(f"--output {dst} holds a previous export: add --overwrite to replace it")


def _check_source(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ExportError(f"--checkpoint {src} is not a directory")
    if not (src / "config.json").is_file():
        epochs = epoch_dirs(src, resumable=False)
        hint = f"; it holds training epochs, e.g. --checkpoint {epochs[-1][1]}" if epochs else ""
        raise ExportError(f"--checkpoint {src} has no config.json: point it at one HF checkpoint directory{hint}")
    config = read_config(src)
    validate_serving_config(config)
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(
            f"--checkpoint {src} has none of the tokenizer files {list(TOKENIZER_FILES)}: vLLM and transformers "
            "need them next to the weights (checkpoints written by mla_components.checkpointing carry them)"
        )
    return config


def _generation_config(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The source's ``generation_config.json``, or greedy defaults from the token ids in ``config.json``."""
    path = src / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {**ids, "do_sample": False}


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``dst/``: a servable HF DeepseekV3 directory made from the checkpoint directory ``src``.

    ``src`` is any directory written by ``mla_components.checkpointing`` (an ``epoch_N`` of training, or an
    initial checkpoint). The export validates ``config.json`` for serving, refuses weights whose keys or shapes
    don't match it (and corrupted safetensors), drops ``recipe_state.pt``, writes ``lm_head.weight`` explicitly
    for tied embeddings (vLLM does not tie DeepseekV3's), casts to ``dtype``, optionally
    quantises the projection weights with torchao, and writes config, weights, tokenizer and generation config
    atomically (a failed export leaves no ``dst``), with a marker file (``mla_export.json``) and a manifest.

    Args:
        src: source checkpoint directory.
        dst: output directory: absent, empty, or a previous export (replaced atomically with ``overwrite``);
            anything else, and any directory inside or above ``src`` or the working directory, is refused.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for every weight (quantised ones keep their scales in it).
        quantize: None, ``int8_weight_only`` or ``float8_weight_only``.
        overwrite: replace a previous export at ``dst``.

    Returns:
        ``dst`` as a ``Path``.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {list(QUANTIZATIONS)} or None, got {quantize!r}")
    check = partial(check_output, src, overwrite=overwrite)
    check(dst)
    config = _check_source(src)  # before reading any weights
    config, tune_state = load_hf_checkpoint(src)  # names missing/unexpected keys; refuses corrupted files
    if config.get("tie_word_embeddings") and "output.weight" not in tune_state:
        # vLLM's DeepseekV3 never ties lm_head to the embedding: without lm_head.weight in the file it serves an
        # uninitialised output layer, silently. transformers ties it anyway (same values either way).
        tune_state["output.weight"] = tune_state["tok_embeddings.weight"].clone()
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "quantization_config")}
    generation = _generation_config(src, config)
    text_files = {
        EXPORT_MARKER: json.dumps({"source": str(src.resolve()), "dtype": dtype, "quantize": quantize}) + "\n",
        # after the copied side files, so this replaces the source's generation_config.json
        "generation_config.json": json.dumps(generation, indent=2, sort_keys=True) + "\n",
    }
    if quantize is None:
        tune_state = {k: v.to(DTYPES[dtype]) for k, v in tune_state.items()}
        return write_hf_checkpoint(
            dst, tune_state, config, side_files_from=src, text_files=text_files, check_target=check
        )
    hf_state = quantize_weights(tune_to_hf(tune_state, config), quantize, DTYPES[dtype])
    config = {**config, "torch_dtype": dtype, "quantization_config": quantization_config(quantize)}
    return write_hf_directory(
        dst, hf_state, config, quantized=True, side_files_from=src, text_files=text_files, check_target=check
    )


def load_exported_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an export back as ``(config.json dict, Torchtune state dict)`` for our own model.

    Quantised weights are dequantised to the export dtype, which is exactly the function a weight-only
    quantised matmul computes; so evaluating our model on this state dict measures the quantisation's quality
    cost (e.g. on the passkey eval) without transformers or vLLM.
    """
    return load_hf_checkpoint(Path(directory), dequantize=True)
