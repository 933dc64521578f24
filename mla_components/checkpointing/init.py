"""Write a freshly initialised model as an HF checkpoint directory: the starting point of SFT from scratch.

    python -m mla_components.checkpointing.init --model mla_tiny --output outputs/mla_tiny/init
    python -m mla_components.checkpointing.init --model gqa_1b --tokenizer-dir /path/to/Llama-3.2-1B \
        --output outputs/gqa_1b/init

Torchtune's recipes always start from a checkpoint; MLA has no public 1B checkpoint, so this writes one (MLA as
``deepseek_v3``, the GQA control as ``llama``) with the tokenizer files next to it.
"""

import argparse
import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mla_components.checkpointing._hf_format import write_hf_checkpoint


def init_weights_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """GPT/DeepSeek-style init: N(0, std) for linear and embedding weights, ones for RMSNorm scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    return model


def resolve_builder(name: str):
    """``mla_tiny`` (a builder of ``mla_components.models``) or a full dotted path to any builder."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "mla_components.models"), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {name!r} is not a builder (e.g. mla_tiny, mla_1b, gqa_tiny, gqa_1b)") from e


def hf_config_of(model: nn.Module, **extra: Any) -> dict[str, Any]:
    if hasattr(model, "mla_config"):
        return model.mla_config.to_hf_config(**extra)
    if hasattr(model, "hf_config"):
        return {**model.hf_config, **extra}
    raise ValueError("the model has no HF config (build it with a builder of mla_components.models)")


def write_initial_checkpoint(
    builder: str, output: Path, *, seed: int = 0, tokenizer_dir: Path | None = None, dtype: str = "float32"
) -> Path:
    """Build ``builder``, initialise it, and write ``output/`` with config, weights, tokenizer, generation config."""
    model = init_weights_(resolve_builder(builder)(), seed=seed).to(getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as side:
        side = Path(side)
        if tokenizer_dir is None:
            from mla_components.data import byte_tokenizer

            tokenizer = byte_tokenizer()
            tokenizer.save_hf_tokenizer(side)
            ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            generation = {**ids, "eos_token_id": list(tokenizer.stop_tokens), "do_sample": False}
            (side / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            config = hf_config_of(model, **ids)
        else:
            tokenizer_dir = Path(tokenizer_dir)
            if not (tokenizer_dir / "tokenizer.json").is_file():
                raise FileNotFoundError(
                    f"tokenizer directory {tokenizer_dir} (checkpointer.init_tokenizer_dir in a config, "
                    "--tokenizer-dir on the command line) has no tokenizer.json: point it at the HF tokenizer files, "
                    "e.g. tune download meta-llama/Llama-3.2-1B-Instruct --output-dir <dir>"
                )
            side = tokenizer_dir
            config = hf_config_of(model)
        return write_hf_checkpoint(output, model.state_dict(), config, side_files_from=side)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="builder name, e.g. mla_tiny, mla_1b, gqa_tiny, gqa_1b")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--tokenizer-dir", type=Path, help="HF tokenizer files to ship (default: the built-in byte tokenizer)"
    )
    args = parser.parse_args(argv)
    path = write_initial_checkpoint(
        args.model, args.output, seed=args.seed, tokenizer_dir=args.tokenizer_dir, dtype=args.dtype
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
