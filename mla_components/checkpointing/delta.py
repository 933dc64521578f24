"""A fine-tuned checkpoint stored as a compact delta over a base checkpoint that can be rebuilt anywhere.

The long-context models (``docs/results/long_context.md``) are full-parameter fine-tunes of the training-free MLA
conversion of the bundled SmolLM2-135M-Instruct: 300 MB in bf16, while the conversion itself reruns on a CPU from the
bundled GGUF. So a tuned model ships as what training changed, under a size budget:

- every weight matrix's change ``dW = W_tuned - W_base`` ``[m, n]`` as a truncated SVD ``dW ~ B A`` with
  ``B = U_r sqrt(S_r)`` ``[m, r]`` and ``A = sqrt(S_r) V_r^T`` ``[r, n]``. The ranks are chosen across all matrices
  at once: one more rank of a matrix costs ``m + n`` stored values and removes ``sigma^2`` of squared error, and the
  ranks with the most error removed per byte are kept until the budget is spent (the best Frobenius approximation of
  the whole change for its size). Factors are int8 with one fp32 scale per rank (a column of ``B``, a row of
  ``A``), or bf16;
- every vector (norm weights) and small matrix (under ``MIN_LOW_RANK`` on a side) as its fp32 change.

The base is fingerprinted: per tensor, its squared norm and two projections onto fixed pseudo-random +-1 patterns.
A delta applied to another base (another calibration, a conversion whose latent dimensions came out in another
order or sign) would give a different model silently; :func:`apply_delta` refuses it, naming the tensor.

    python -m mla_components.checkpointing.delta extract --base BASE_DIR --tuned TUNED_DIR --output delta.safetensors \\
        --max-mb 20 --base-recipe "how BASE_DIR is rebuilt"
    python -m mla_components.checkpointing.delta apply --base BASE_DIR --delta delta.safetensors --output TUNED_COPY
    python -m mla_components.checkpointing.delta inspect delta.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mla_components.checkpointing._hf_format import (
    DTYPES,
    atomic_file,
    read_config,
    read_safetensors,
    write_hf_directory,
)

FORMAT = "mla_components.delta/1"
MIN_LOW_RANK = 32  # matrices with a side shorter than this are stored whole (a rank would cost nearly as much)
NEGLIGIBLE_SIGMA = 1e-4  # of a matrix's largest singular value: far below what int8 or bf16 factors resolve
FINGERPRINT_TOLERANCE = 1e-3  # of ||W||: numerical noise of a rebuilt base is ~1e-6; a flipped latent dim is ~1e-1
_FACTOR_BYTES = {8: 1, 16: 2}


@dataclass(frozen=True)
class _Matrix:
    name: str
    u: torch.Tensor  # [m, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, n]
    total: float  # ||dW||^2


def base_fingerprint(name: str, tensor: torch.Tensor) -> list[float]:
    """``[||W||^2, <W, P1>, <W, P2>]`` in float64, with ``P1``, ``P2`` +-1 patterns seeded by the tensor's name."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    values = [float(flat.dot(flat))]
    for k in range(2):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
        pattern = torch.randint(0, 2, flat.shape, generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        values.append(float(flat.dot(pattern)))
    return values


def check_base(state: dict[str, torch.Tensor], fingerprint: dict[str, Any]) -> None:
    """Raise a ValueError naming the first tensor of ``state`` that is not the fingerprinted base."""
    missing = sorted(set(fingerprint) - set(state))
    extra = sorted(set(state) - set(fingerprint))
    if missing or extra:
        raise ValueError(
            f"the base checkpoint does not have the delta's tensors (missing {missing[:3]}, unexpected {extra[:3]}): "
            "rebuild the base the delta names (`inspect` prints its base_recipe)"
        )
    for name, entry in fingerprint.items():
        tensor = state[name]
        if list(tensor.shape) != entry["shape"]:
            raise ValueError(f"base tensor {name} is {list(tensor.shape)}, the delta's base had {entry['shape']}")
        got, want = base_fingerprint(name, tensor), entry["fingerprint"]
        scale = max(want[0], 1e-30) ** 0.5
        worst = max(abs(got[0] ** 0.5 - scale), *(abs(g - w) for g, w in zip(got[1:], want[1:], strict=True)))
        if worst > FINGERPRINT_TOLERANCE * scale:
            raise ValueError(
                f"base tensor {name} differs from the delta's base by {worst / scale:.2e} of its norm (tolerance "
                f"{FINGERPRINT_TOLERANCE:g}): this base is not the one the delta was made over; rebuild it with the "
                "delta's base_recipe (`inspect` prints it) on the same origin"
            )


def _quantize(factor: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric int8 along ``dim`` (one fp32 scale per index of the other dim), or bf16."""
    if bits == 16:
        return factor.to(torch.bfloat16).contiguous(), None
    scale = factor.abs().amax(dim=dim).clamp_min(1e-30) / 127.0
    shape = (1, -1) if dim == 0 else (-1, 1)
    return torch.round(factor / scale.view(shape)).to(torch.int8).contiguous(), scale.to(torch.float32)


def _dequantize(values: torch.Tensor, scale: torch.Tensor | None, dim: int) -> torch.Tensor:
    if scale is None:
        return values.to(torch.float32)
    return values.to(torch.float32) * scale.view((1, -1) if dim == 0 else (-1, 1))


@dataclass(frozen=True)
class Change:
    """``tuned - base`` decomposed once (:func:`decompose_change`), to be stored under any budget
    (:func:`compress_change`): the vectors and small matrices as they are, the other matrices as SVDs."""

    whole: dict[str, torch.Tensor]  # name -> fp32 change, stored as is
    matrices: list[_Matrix]
    total_energy: float  # sum of ||dW||^2 over every tensor


def decompose_change(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> Change:
    """Check that ``base`` and ``tuned`` (HF state dicts) have the same tensors and shapes, and decompose the change.
    The change is taken against the base rounded as the tuned weights are (bf16): the rounding is no change.
    ``device`` runs the SVDs (a GPU takes seconds for the 135M model where two CPU cores take minutes); the
    decomposition comes back on the CPU."""
    if set(base) != set(tuned):
        raise ValueError(
            f"base and tuned checkpoints have different tensors: only in base {sorted(set(base) - set(tuned))[:3]}, "
            f"only in tuned {sorted(set(tuned) - set(base))[:3]}"
        )
    whole: dict[str, torch.Tensor] = {}
    matrices: list[_Matrix] = []
    total_energy = 0.0
    for name in sorted(base):
        if base[name].shape != tuned[name].shape:
            raise ValueError(f"{name}: base {tuple(base[name].shape)} vs tuned {tuple(tuned[name].shape)}")
        change = tuned[name].to(torch.float32) - base[name].to(tuned[name].dtype).to(torch.float32)
        energy = float(change.double().pow(2).sum())
        total_energy += energy
        if energy == 0.0:
            continue
        if change.ndim == 2 and min(change.shape) >= MIN_LOW_RANK:
            u, s, vh = (f.cpu() for f in torch.linalg.svd(change.to(device), full_matrices=False))
            matrices.append(_Matrix(name, u, s, vh, energy))
        else:
            whole[name] = change.contiguous()
    return Change(whole, matrices, total_energy)


def extract_delta(
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    max_bytes: int,
    *,
    bits: int = 8,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``tuned - base`` within ``max_bytes`` of tensors -> ``(tensors, report)``: :func:`decompose_change`, then
    :func:`compress_change`. ``base``, ``tuned``: HF state dicts with the same keys and shapes."""
    return compress_change(decompose_change(base, tuned), max_bytes, bits=bits)


def compress_change(change: Change, max_bytes: int, *, bits: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored form of a decomposed change within ``max_bytes`` of tensors.

    Args:
        change: from :func:`decompose_change`.
        max_bytes: budget for the stored tensors (the file adds its header and metadata).
        bits: 8 (int8 factors with per-rank scales) or 16 (bf16 factors).

    Returns:
        The tensors to store (``<name>.delta_b``/``.delta_a`` [+ ``_scale``] or ``<name>.delta``) and a report:
        per tensor its rank (or ``"full"``) and the relative Frobenius error of its stored change, and overall
        ``kept_energy``, the share of ``sum ||dW||^2`` that the stored change reproduces.
    """
    if bits not in _FACTOR_BYTES:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    tensors = {f"{name}.delta": whole for name, whole in change.whole.items()}
    report: dict[str, Any] = {"tensors": {name: {"rank": "full", "error": 0.0} for name in change.whole}}
    spent = sum(t.numel() * 4 for t in change.whole.values())
    kept = sum(float(t.double().pow(2).sum()) for t in change.whole.values())
    if spent > max_bytes:
        raise ValueError(f"the vectors and small matrices alone take {spent:,} bytes, over max_bytes {max_bytes:,}")

    # every rank of every matrix is a candidate: gain sigma^2, cost (m + n) factor values + 2 scales
    value_bytes = _FACTOR_BYTES[bits]
    candidates = []
    for index, matrix in enumerate(change.matrices):
        m, n = matrix.u.shape[0], matrix.vh.shape[1]
        cost = (m + n) * value_bytes + (8 if bits == 8 else 0)
        # directions below NEGLIGIBLE_SIGMA of the largest are float noise (a change of lower rank): never worth bytes
        gains = matrix.s[matrix.s > matrix.s[0] * NEGLIGIBLE_SIGMA].double().pow(2)
        candidates += [(float(g) / cost, index, cost) for g in gains]
    ranks = [0] * len(change.matrices)
    for _, index, cost in sorted(candidates, key=lambda c: -c[0]):  # within a matrix, sigma decreases
        if spent + cost > max_bytes:
            break
        ranks[index] += 1
        spent += cost

    for matrix, rank in zip(change.matrices, ranks, strict=True):
        if rank == 0:
            report["tensors"][matrix.name] = {"rank": 0, "error": 1.0}
            continue
        root = matrix.s[:rank].sqrt()
        b, b_scale = _quantize(matrix.u[:, :rank] * root, 0, bits)
        a, a_scale = _quantize(root[:, None] * matrix.vh[:rank], 1, bits)
        tensors[f"{matrix.name}.delta_b"], tensors[f"{matrix.name}.delta_a"] = b, a
        if b_scale is not None:
            tensors[f"{matrix.name}.delta_b_scale"], tensors[f"{matrix.name}.delta_a_scale"] = b_scale, a_scale
        stored = _dequantize(b, b_scale, 0) @ _dequantize(a, a_scale, 1)
        error = float((matrix.u * matrix.s @ matrix.vh - stored).double().pow(2).sum())
        kept += matrix.total - error
        report["tensors"][matrix.name] = {"rank": rank, "error": (error / matrix.total) ** 0.5}
    report.update(
        bits=bits,
        tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        kept_energy=kept / change.total_energy if change.total_energy else 1.0,
        changed_tensors=len(report["tensors"]),
    )
    return tensors, report


def apply_delta(
    base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``base`` rounded to ``dtype`` (the tuned model's: the change was taken against that rounding) + the stored
    change, in float32 (the caller casts)."""
    unknown = {key.rsplit(".delta", 1)[0] for key in tensors} - set(base)
    if unknown:
        raise ValueError(f"the delta changes tensors the base does not have: {sorted(unknown)[:3]}")
    tuned = {}
    for name, weight in base.items():
        weight = weight.to(dtype).to(torch.float32)
        if f"{name}.delta" in tensors:
            weight = weight + tensors[f"{name}.delta"].to(torch.float32)
        elif f"{name}.delta_b" in tensors:
            b = _dequantize(tensors[f"{name}.delta_b"], tensors.get(f"{name}.delta_b_scale"), 0)
            a = _dequantize(tensors[f"{name}.delta_a"], tensors.get(f"{name}.delta_a_scale"), 1)
            weight = weight + b @ a
        tuned[name] = weight
    return tuned


def fingerprint_state(base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{name: {shape, fingerprint}}`` of every tensor of a base state dict (what :func:`check_base` checks)."""
    return {
        name: {"shape": list(t.shape), "fingerprint": base_fingerprint(name, t)} for name, t in sorted(base.items())
    }


def save_delta(
    path: Path, tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any], config: dict, base_recipe: str, report
) -> Path:
    """Write the delta file atomically: tensors + metadata (format, the tuned ``config.json``, the base's
    fingerprint (:func:`fingerprint_state`), how to rebuild the base, the extraction report)."""
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "base_fingerprint": json.dumps(fingerprint),
        "base_recipe": base_recipe,
        "report": json.dumps(report, sort_keys=True),
    }
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def load_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a delta file, with the JSON fields decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a delta file of format {FORMAT} (format {metadata.get('format')!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    for key in ("config", "base_fingerprint", "report"):
        metadata[key] = json.loads(metadata[key])
    return tensors, metadata


def rebuild(base_dir: Path, delta_path: Path, output_dir: Path) -> Path:
    """Check ``base_dir`` against the delta's fingerprint (before any other work), add the change and write an HF
    directory: the tuned config, the base's tokenizer files, weights in the config's ``torch_dtype``."""
    tensors, metadata = load_delta(delta_path)
    base = read_safetensors(Path(base_dir))
    check_base(base, metadata["base_fingerprint"])
    config = metadata["config"]
    dtype = DTYPES[config.get("torch_dtype", "float32")]
    tuned = {name: weight.to(dtype).contiguous() for name, weight in apply_delta(base, tensors, dtype).items()}
    return write_hf_directory(Path(output_dir), tuned, config, side_files_from=Path(base_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mla_components.checkpointing.delta", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extract", help="tuned HF directory - base HF directory -> delta file")
    ext.add_argument("--base", required=True, type=Path)
    ext.add_argument("--tuned", required=True, type=Path)
    ext.add_argument("--output", required=True, type=Path)
    ext.add_argument("--max-mb", type=float, default=20.0, help="largest file size, MB of 10^6 bytes (default 20)")
    ext.add_argument("--bits", type=int, choices=(8, 16), default=8, help="factor precision (default int8)")
    ext.add_argument("--base-recipe", required=True, help="how a user rebuilds --base (stored, printed by inspect)")
    ext.add_argument("--device", default="cpu", help="where the SVDs run, e.g. cuda (default cpu)")
    app = sub.add_parser("apply", help="base HF directory + delta file -> tuned HF directory")
    app.add_argument("--base", required=True, type=Path)
    app.add_argument("--delta", required=True, type=Path)
    app.add_argument("--output", required=True, type=Path)
    ins = sub.add_parser("inspect", help="print a delta file's base recipe and report")
    ins.add_argument("delta", type=Path)
    args = parser.parse_args(argv)

    if args.command == "extract":
        if args.max_mb <= 0:
            parser.error(f"--max-mb must be positive, got {args.max_mb}")
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:  # an unknown name, or a device this torch build cannot use
            parser.error(f"--device {args.device} cannot be used here ({str(e).splitlines()[0]}); use --device cpu")
        base, tuned, config = read_safetensors(args.base), read_safetensors(args.tuned), read_config(args.tuned)
        fingerprint = fingerprint_state(base)
        cap = int(args.max_mb * 1e6)
        # first guess at the header (names, offsets) and metadata; corrected from the size of the file written
        overhead = len(json.dumps(fingerprint)) + len(json.dumps(config)) + len(args.base_recipe) + 1024 * len(base)
        budget = cap - overhead
        change = decompose_change(base, tuned, args.device)
        for _ in range(3):
            tensors, report = compress_change(change, budget, bits=args.bits)
            save_delta(args.output, tensors, fingerprint, config, args.base_recipe, report)
            size = args.output.stat().st_size
            if size <= cap:
                break
            budget -= size - cap + 2**12
        else:
            raise RuntimeError(f"{args.output} stays over --max-mb {args.max_mb} ({size:,} bytes)")
        summary = {k: v for k, v in report.items() if k != "tensors"}
        print(json.dumps(summary | {"file_bytes": size}, indent=2))
    elif args.command == "apply":
        print(rebuild(args.base, args.delta, args.output))
    else:
        _, metadata = load_delta(args.delta)
        print(json.dumps({k: metadata[k] for k in ("base_recipe", "report")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
