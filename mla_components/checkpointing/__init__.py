"""HF-format checkpoints for the MLA family and its GQA control: atomic writes, exact resume, fresh inits."""

from mla_components.checkpointing._checkpointer import AtomicHFCheckpointer, epoch_dirs, latest_resumable_epoch
from mla_components.checkpointing._hf_format import (
    atomic_directory,
    atomic_file,
    load_hf_checkpoint,
    read_config,
    read_safetensors,
    verify_manifest,
    write_hf_checkpoint,
)

__all__ = [
    "AtomicHFCheckpointer",
    "atomic_directory",
    "atomic_file",
    "epoch_dirs",
    "latest_resumable_epoch",
    "load_hf_checkpoint",
    "read_config",
    "read_safetensors",
    "verify_manifest",
    "write_hf_checkpoint",
]
