"""HF checkpoint directories for both model families: MLA (``deepseek_v3``) and the GQA control (``llama``).

One place knows how a Torchtune state dict maps onto an HF directory; training, export and evaluation all go
through it. Every write goes to a temporary sibling directory that is renamed into place only when complete, so a
process killed mid-save leaves the previous checkpoint untouched.
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchtune.models import convert_weights

from mla_components.checkpointing._quantized import read_quantized_safetensors, save_quantized_safetensors
from mla_components.models import MLAConfig, mla, mla_hf_to_tune, mla_tune_to_hf

# Files copied along with the weights so every checkpoint directory is self-contained for transformers and vLLM.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST_NAME = "checkpoint_manifest.json"  # sizes and SHA-256 of the other files, written last


@contextmanager
def atomic_directory(target: Path, *, check_target: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` in one rename.

    The files written in the block become world-readable (0644) and get a manifest (:func:`write_manifest`),
    written last. ``check_target(target)`` runs just before ``target`` is replaced and may raise to keep it.
    A crash inside the block leaves only a ``.<name>.tmp-*`` directory (ignored and cleaned by readers); a crash
    between the two renames of an overwrite leaves ``.<name>.old-*`` holding the complete previous version.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        tmp.chmod(0o755)
        for path in tmp.iterdir():  # data on disk before the rename makes it visible
            path.chmod(0o644)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if check_target is not None:
            check_target(target)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` for one file; on success the file is synced, made world-readable
    (0644) and renamed onto ``target`` (a reader sees the old file or the whole new one); on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Write ``directory/checkpoint_manifest.json``: the size and SHA-256 of every other file in it."""
    directory = Path(directory)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    return path


def verify_manifest(directory: Path) -> int | None:
    """Check every file listed in ``directory``'s manifest against its size and SHA-256; returns how many were
    checked, or None when the directory has no manifest (written before manifests, or by another tool).

    Raises:
        ValueError: a listed file is missing, has another size or another digest (named with the fix).
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"refusing {directory}: its {MANIFEST_NAME} is unreadable ({e})") from e
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != expected["size"]:
            problem = f"has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        elif _sha256(path) != expected["sha256"]:
            problem = "does not match its SHA-256 in the manifest (the file was modified or corrupted)"
        else:
            continue
        raise ValueError(
            f"refusing corrupted checkpoint file {path}: it {problem}; restore it from a copy or use another "
            f"checkpoint (if you changed it on purpose, delete {manifest})"
        )
    return len(files)


def recover_interrupted_writes(parent: Path) -> None:
    """Undo what a process killed inside :func:`atomic_directory` left in ``parent``: ``.<name>.tmp-*`` (an
    incomplete new version) is deleted; ``.<name>.old-*`` (the complete previous version, moved aside just before
    the new one was renamed in) is renamed back when ``<name>`` is missing, and deleted otherwise."""
    parent = Path(parent)
    for tmp in parent.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in parent.glob(".*.old-*"):
        target = parent / old.name[1:].rsplit(".old-", 1)[0]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_dir {directory} has no config.json (expected an HF model directory)")
    return json.loads(path.read_text())


def write_config(directory: Path, config: dict[str, Any]) -> None:
    """``directory/config.json``, sorted and indented (diffable between checkpoints)."""
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files (:data:`SIDE_FILES`) that ``src`` has into ``dst``."""
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def read_safetensors(directory: Path, files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load and merge the weight files of ``directory``; a corrupted or truncated file is refused by name."""
    directory = Path(directory)
    if files is None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint_dir {directory} has no *.safetensors weight files")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_files: {path} does not exist")
        try:
            state_dict.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"refusing corrupted safetensors file {path}: {e}") from e
    return state_dict


def _llama_shapes(config: dict[str, Any]) -> dict[str, int]:
    heads = config["num_attention_heads"]
    return dict(
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        dim=config["hidden_size"],
        head_dim=config.get("head_dim", config["hidden_size"] // heads),
    )


def hf_to_tune(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF keys -> Torchtune keys for a ``deepseek_v3`` (MLA) or ``llama`` (GQA control) ``config.json``."""
    model_type = config.get("model_type")
    if model_type == "deepseek_v3":
        return mla_hf_to_tune(state_dict, tie_word_embeddings=config.get("tie_word_embeddings", False))
    if model_type == "llama":
        try:
            return convert_weights.hf_to_tune(state_dict, **_llama_shapes(config))
        except Exception as e:  # Torchtune raises a bare Exception for keys it does not know
            raise ValueError(
                f"config.json has model_type 'llama' but the weights don't convert as Llama ({e}); if they are MLA "
                "weights, config.json must say model_type 'deepseek_v3'"
            ) from e
    raise ValueError(f"config.json model_type {model_type!r} is not supported (deepseek_v3 or llama)")


def tune_to_hf(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Torchtune keys -> HF keys (inverse of ``hf_to_tune``)."""
    model_type = config.get("model_type")
    if model_type == "deepseek_v3":
        return mla_tune_to_hf(state_dict)
    if model_type == "llama":
        return convert_weights.tune_to_hf(state_dict, **_llama_shapes(config))
    raise ValueError(f"config.json model_type {model_type!r} is not supported (deepseek_v3 or llama)")


def check_mla_keys(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Refuse MLA weights whose keys or shapes don't match the model ``config.json`` describes, naming them."""
    with torch.device("meta"):
        expected = mla(MLAConfig.from_hf_config(config)).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            "checkpoint weights don't match the model in config.json: "
            f"missing keys {missing}, unexpected keys {unexpected}, wrong shapes {wrong}"
        )


def load_hf_checkpoint(
    directory: Path, files: list[str] | None = None, *, dequantize: bool = False
) -> tuple[dict[str, Any], dict]:
    """Read an HF directory into ``(config.json dict, Torchtune state dict)``, verifying its manifest (when it has
    one) and validating MLA keys.

    With ``dequantize``, a weight-only quantised directory (``quantization_config`` in config.json, written by
    ``mla_components.export``) is read with its weights dequantised to its ``torch_dtype``: exactly the function a
    weight-only quantised matmul computes (``files`` does not apply: an export is one file)."""
    verify_manifest(directory)
    config = read_config(directory)
    if dequantize and "quantization_config" in config:
        dtype = DTYPES[config.get("torch_dtype", "bfloat16")]
        return config, hf_to_tune(read_quantized_safetensors(Path(directory) / WEIGHTS_NAME, dtype), config)
    hf_state = read_safetensors(directory, files)
    try:
        tune_state = hf_to_tune(hf_state, config)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from e
    if config.get("model_type") == "deepseek_v3":
        check_mla_keys(tune_state, config)
    return config, tune_state


def write_hf_checkpoint(
    target: Path,
    tune_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    side_files_from: Path | None = None,
    extra: dict[str, Any] | None = None,
    text_files: dict[str, str] | None = None,
    check_target: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write ``target/`` = config.json + model.safetensors (+ tokenizer/generation files copied from
    ``side_files_from``, + ``extra`` objects saved with ``torch.save`` as ``<name>.pt``, + ``text_files`` by name)
    and its manifest; ``check_target`` as in :func:`atomic_directory`."""
    hf_state = {k: v.detach().to("cpu").contiguous() for k, v in tune_to_hf(tune_state, config).items()}
    dtypes = {v.dtype for v in hf_state.values()}
    config = dict(config)
    if len(dtypes) == 1:
        config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    return write_hf_directory(
        target,
        hf_state,
        config,
        side_files_from=side_files_from,
        extra=extra,
        text_files=text_files,
        check_target=check_target,
    )


def write_hf_directory(
    target: Path,
    hf_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    quantized: bool = False,
    side_files_from: Path | None = None,
    extra: dict[str, Any] | None = None,
    text_files: dict[str, str] | None = None,
    check_target: Callable[[Path], None] | None = None,
) -> Path:
    """:func:`write_hf_checkpoint` for a state dict already in HF keys, written as is (``config`` unchanged);
    ``quantized``: it holds torchao tensor subclasses, saved in torchao's safetensors layout. Files are written in
    this order, so ``text_files`` replace same-named side files."""
    with atomic_directory(Path(target), check_target=check_target) as tmp:
        if quantized:
            save_quantized_safetensors(hf_state, tmp / WEIGHTS_NAME)
        else:
            save_file(hf_state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_config(tmp, config)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / f"{name}.pt")
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
    return Path(target)
