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


def _check_source(src: Path, pad_latent_to: int | None = None) -> dict[str, Any]:
    if not src.is_dir():
        raise ExportError(f"--checkpoint {src} is not a directory")
    if not (src / "config.json").is_file():
        epochs = epoch_dirs(src, resumable=False)
        hint = f"; it holds training epochs, e.g. --checkpoint {epochs[-1][1]}" if epochs else ""
        raise ExportError(f"--checkpoint {src} has no config.json: point it at one HF checkpoint directory{hint}")
    config = read_config(src)
    if pad_latent_to is not None:
        rank = config.get("kv_lora_rank")
        if not isinstance(pad_latent_to, int) or not isinstance(rank, int) or pad_latent_to < rank:
            raise ExportError(
                f"--pad-latent {pad_latent_to!r} must be an integer >= the checkpoint's kv_lora_rank {rank!r} "
                "(it widens an MLA latent with zeros; it cannot narrow one)"
            )
        config = {**config, "kv_lora_rank": pad_latent_to}
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


def pad_latent(
    tune_state: dict[str, torch.Tensor], config: dict[str, Any], rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The same model with a wider latent: ``kv_lora_rank`` ``r`` -> ``rank``, for servers whose MLA kernels take
    one latent width only (vLLM: 512 + 64). The new latent dims are zero: ``kv_a_proj`` ``[r + d_r, d]`` gets zero
    rows between its latent and rope rows, ``kv_b_proj`` ``[n_h (d_n + d_v), r]`` zero columns. The latent RMSNorm
    then averages over ``rank`` values, ``r`` of them non-zero, so its weight is scaled by ``sqrt(r / rank)``: the
    output equals the original's with the norm's epsilon ``rank / r`` times larger (``1e-5`` -> ``2e-5`` for
    256 -> 512, against latents of mean square ~1; a relative change below ``1e-5``). The cache a server allocates
    grows to ``rank + d_r`` values per token and layer: the price of serving, not of the model."""
    r = config.get("kv_lora_rank")
    if config.get("model_type") != "deepseek_v3" or not isinstance(r, int):
        raise ExportError(
            f"pad_latent applies to MLA (deepseek_v3) checkpoints, not model_type {config.get('model_type')!r}"
        )
    if not isinstance(rank, int) or rank < r:
        raise ExportError(f"pad_latent must be an integer >= the checkpoint's kv_lora_rank {r}, got {rank!r}")
    if rank == r:
        return tune_state, config
    state = dict(tune_state)
    for name, weight in tune_state.items():
        if name.endswith(".attn.kv_a_proj.weight"):  # [r + d_r, d]: latent rows, then rope rows
            zeros = weight.new_zeros(rank - r, weight.shape[1])
            state[name] = torch.cat([weight[:r], zeros, weight[r:]])
        elif name.endswith(".attn.kv_b_proj.weight"):  # [n_h (d_n + d_v), r]
            state[name] = torch.cat([weight, weight.new_zeros(weight.shape[0], rank - r)], dim=1)
        elif name.endswith(".attn.kv_a_norm.scale"):  # [r]
            scaled = weight.double() * (r / rank) ** 0.5
            state[name] = torch.cat([scaled.to(weight.dtype), weight.new_zeros(rank - r)])
    return state, {**config, "kv_lora_rank": rank}


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    pad_latent_to: int | None = None,
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
        pad_latent_to: widen the latent to this ``kv_lora_rank`` (:func:`pad_latent`), e.g. 512 to serve a
            256 + 64 model with vLLM, whose MLA kernels take 512 + 64 only.
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
    config = _check_source(src, pad_latent_to)  # before reading any weights
    config, tune_state = load_hf_checkpoint(src)  # names missing/unexpected keys; refuses corrupted files
    if pad_latent_to is not None:
        tune_state, config = pad_latent(tune_state, config, pad_latent_to)
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
