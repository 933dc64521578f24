"""CLI: ``python -m mla_components.export --checkpoint DIR --output DIR [--dtype ...] [--quantize ...]``."""

import argparse
import sys
from pathlib import Path

from mla_components.export import DTYPES, QUANTIZATIONS, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mla_components.export",
        description="Turn a training checkpoint (an epoch_N directory or any HF directory written by "
        "mla_components.checkpointing) into a servable HF DeepseekV3 directory for vLLM and transformers.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="source checkpoint directory")
    parser.add_argument(
        "--output", required=True, type=Path, help="export directory: absent, empty, or a previous export (--overwrite)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="torchao weight-only quantisation (optional)")
    parser.add_argument(
        "--pad-latent", type=int, metavar="RANK", help="widen a smaller MLA latent with zeros to RANK (vLLM: 512)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export at --output, atomically")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(
            args.checkpoint,
            args.output,
            dtype=args.dtype,
            quantize=args.quantize,
            pad_latent_to=args.pad_latent,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:  # ExportError is a ValueError; OSError: permissions, full disk, ...
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    print(f"wrote {path} ({', '.join(sorted(p.name for p in path.iterdir()))}; {size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
