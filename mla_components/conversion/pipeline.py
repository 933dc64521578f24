"""The conversion run behind ``recipes/convert_to_mla.py``: origin in, calibrated MLA checkpoint and report out.

Config fields (``configs/smollm2_135m/convert_mla_256.yaml`` documents each): ``origin.source``, ``kv_lora_rank``,
``qk_rope_head_dim``, ``latent_whitening``, ``norm_stabilizer_dims``, ``calibration.{sequences, seq_len, seed}``,
``calibration.tokens_file``, ``heldout.{sequences, seq_len}``, ``max_seq_len``, ``output_dir``,
``origin_output_dir``, ``device``.

The calibration text comes with Python (``mla_components.data.corpus_texts``), so it differs between Python
versions, and so do the converted weights. Every run writes the token windows it calibrated on to
``output_dir/calibration_tokens.safetensors``; ``calibration.tokens_file`` set to such a file reruns a conversion
with exactly those tokens on any machine (what a delta over a conversion, ``mla_components.checkpointing.delta``,
needs of its base).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.modules import TransformerDecoder

from mla_components.checkpointing import atomic_file, write_hf_checkpoint
from mla_components.conversion.gqa_to_mla import (
    ConversionResult,
    LayerCalibration,
    OriginShape,
    check_conversion_args,
    convert_llama_to_mla,
)
from mla_components.conversion.origin import (
    OriginCheckpoint,
    load_origin,
    origin_attention_shape,
    origin_model,
    write_origin,
)
from mla_components.data import corpus_texts, hf_tokenizer
from mla_components.models import mla, mla_hf_to_tune

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"  # output_dir/model is the converted HF DeepseekV3 directory
REPORT_NAME = "conversion_report.json"
CALIBRATION_TOKENS_NAME = "calibration_tokens.safetensors"  # the windows a run calibrated on (key "tokens")


def token_windows(tokenizer: Any, split: str, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[count, seq_len]`` windows of the offline corpus's ``split``, at seeded random offsets of its token
    stream (documents joined with blank lines)."""
    stream = tokenizer.encode("\n\n".join(corpus_texts(split)), add_bos=False, add_eos=False)
    if len(stream) < seq_len + 1:
        raise ValueError(f"the {split} corpus has {len(stream)} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(count)]
    return torch.tensor([stream[s : s + seq_len] for s in starts], dtype=torch.long)


def read_calibration_tokens(path: str | Path, vocab_size: int | None = None) -> torch.Tensor:
    """The ``[sequences, seq_len]`` token ids of a calibration tokens file (``calibration.tokens_file``), checked: an
    existing file, one 2-D integer tensor ``tokens``, ids below ``vocab_size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration.tokens_file {path} does not exist (a conversion writes {CALIBRATION_TOKENS_NAME} into its "
            "output_dir; null calibrates on the offline corpus)"
        )
    try:
        tokens = load_file(path).get("tokens")
    except Exception as e:  # safetensors raises several types for a file that is not one
        raise ValueError(f"calibration.tokens_file {path} is not a safetensors file: {e}") from e
    if tokens is None or tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64) or tokens.numel() == 0:
        raise ValueError(
            f"calibration.tokens_file {path} must hold one non-empty 2-D integer tensor 'tokens' [sequences, seq_len]"
        )
    tokens = tokens.to(torch.long)
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, path)
    return tokens


def check_token_ids(tokens: torch.Tensor, vocab_size: int, path: str | Path) -> None:
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"calibration.tokens_file {path} has token ids outside [0, {vocab_size}): written for another tokenizer"
        )


def write_calibration_tokens(path: str | Path, tokens: torch.Tensor, source: str) -> Path:
    """Save calibration windows (int32) with where they came from and the Python version that made them."""
    metadata = {"source": source, "python": sys.version.split()[0]}
    with atomic_file(Path(path)) as tmp:
        save_file({"tokens": tokens.to(torch.int32).contiguous()}, tmp, metadata=metadata)
    return Path(path)


@torch.no_grad()
def calibrate(
    model: TransformerDecoder, tokens: torch.Tensor, samples: int = 8192, seed: int = 0
) -> list[LayerCalibration]:
    """Run the origin on ``tokens [n, s]`` and collect, per layer, ``E[x x^T]`` of the attention input (the
    output of the layer's ``sa_norm``) and about ``samples`` of its rows, drawn evenly over the sequences (all of
    them when there are fewer)."""
    samples_per_sequence = -(-samples // len(tokens))
    generator = torch.Generator().manual_seed(seed)
    moments: list[torch.Tensor | None] = [None] * len(model.layers)
    kept: list[list[torch.Tensor]] = [[] for _ in model.layers]
    counted = 0

    def hook(index: int):
        def collect(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            x = output.reshape(-1, output.shape[-1]).to(torch.float64)
            moment = x.T @ x
            moments[index] = moment if moments[index] is None else moments[index] + moment
            rows = torch.randperm(x.shape[0], generator=generator)[:samples_per_sequence]
            kept[index].append(output.reshape(-1, output.shape[-1])[rows.to(output.device)].float().cpu())

        return collect

    handles = [layer.sa_norm.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        device = next(model.parameters()).device
        for row in tokens:
            model(row[None].to(device))
            counted += row.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [LayerCalibration((m / counted).cpu(), torch.cat(s)) for m, s in zip(moments, kept, strict=True)]


@torch.no_grad()
def compare_on_heldout(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Perplexity of both models and the mean next-token KL(teacher || student) over ``tokens [n, s]``."""
    device = next(student.parameters()).device
    nll_student = nll_teacher = kl = 0.0
    count = 0
    for row in tokens:
        x = row[None].to(device)
        log_p = torch.log_softmax(teacher(x)[0, :-1].float(), -1)
        log_q = torch.log_softmax(student(x)[0, :-1].float(), -1)
        target = x[0, 1:, None]
        nll_teacher -= float(log_p.gather(-1, target).sum())
        nll_student -= float(log_q.gather(-1, target).sum())
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        count += row.numel() - 1
    return {
        "tokens": count,
        "perplexity_origin": math.exp(nll_teacher / count),
        "perplexity_converted": math.exp(nll_student / count),
        "kl_origin_to_converted": kl / count,
    }


def converted_model(result: ConversionResult) -> tuple[TransformerDecoder, dict[str, torch.Tensor]]:
    """The converted MLA model (fp32, eval mode) and its Torchtune state dict."""
    tune_state = mla_hf_to_tune(result.hf_state_dict, tie_word_embeddings=result.config.tie_word_embeddings)
    model = mla(result.config.replace(kernel_backend="torch"))
    model.load_state_dict(tune_state, strict=True)
    return model.eval(), tune_state


def _write_tokenizer(origin: OriginCheckpoint, directory: Path) -> Path:
    for name, data in origin.tokenizer_files.items():
        (directory / name).write_bytes(data)
    return directory


def run_conversion(cfg: Any) -> dict[str, Any]:
    """Load the origin, calibrate, convert, write ``output_dir/model`` (HF DeepseekV3) and the report."""
    with contextlib.ExitStack() as stack:
        return _run_conversion(cfg, stack)


def _run_conversion(cfg: Any, stack: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    kv_lora_rank, rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    output_dir = Path(cfg.output_dir)
    source = cfg.origin.source  # a `???` (required) source raises MissingMandatoryValue naming origin.source
    check_conversion_args(OriginShape.from_hf_config(origin_attention_shape(source)), kv_lora_rank, rope_dim)
    tokens_file = cfg.calibration.get("tokens_file")
    if tokens_file:
        calibration_tokens = read_calibration_tokens(tokens_file)  # before the origin loads
    origin = load_origin(source)
    device = torch.device(cfg.get("device", "cpu"))
    torch.manual_seed(cfg.calibration.get("seed", 0))
    if cfg.get("origin_output_dir"):
        write_origin(origin, cfg.origin_output_dir)
    tokenizer_dir = _write_tokenizer(origin, Path(stack.enter_context(tempfile.TemporaryDirectory())))
    tokenizer = hf_tokenizer(str(tokenizer_dir))
    teacher = origin_model(origin).to(device)
    if tokens_file:
        check_token_ids(calibration_tokens, origin.config["vocab_size"], tokens_file)
        calibration_source = f"file {tokens_file}"
    else:
        calibration_tokens = token_windows(
            tokenizer, "train", cfg.calibration.sequences, cfg.calibration.seq_len, cfg.calibration.get("seed", 0)
        )
        calibration_source = "offline corpus, train split"
    write_calibration_tokens(output_dir / CALIBRATION_TOKENS_NAME, calibration_tokens, calibration_source)
    calibration = calibrate(teacher, calibration_tokens, seed=cfg.calibration.get("seed", 0))
    result = convert_llama_to_mla(
        origin.config,
        origin.state_dict,
        calibration,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=rope_dim,
        whitening=cfg.get("latent_whitening", 0.0),
        stabilizer_dims=cfg.get("norm_stabilizer_dims", 0),
        max_seq_len=cfg.get("max_seq_len"),
    )
    student, tune_state = converted_model(result)
    write_hf_checkpoint(
        output_dir / MODEL_SUBDIR,
        tune_state,
        result.config.to_hf_config(),
        side_files_from=tokenizer_dir,
    )
    heldout = token_windows(tokenizer, "heldout", cfg.heldout.sequences, cfg.heldout.seq_len, seed=1)
    report = {
        "origin": origin.source,
        **result.summary(),
        "origin_cache_values_per_token_and_layer": 2 * origin.config["num_key_value_heads"] * origin.config["head_dim"],
        "calibration_tokens": int(calibration_tokens.numel()),
        "calibration_source": calibration_source,
        "heldout": compare_on_heldout(student.to(device), teacher, heldout),
        "seconds": round(time.perf_counter() - started, 1),
        "layers": [vars(r) for r in result.layers],
    }
    (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    log.info("converted %s -> %s: %s", origin.source, output_dir / MODEL_SUBDIR, json.dumps(report["heldout"]))
    return report


def heldout_report(
    origin_dir: str | Path, checkpoints: dict[str, str | Path], sequences: int, seq_len: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """:func:`compare_on_heldout` of each checkpoint (HF DeepseekV3, or HF Llama such as a trained GQA control)
    against the origin HF Llama directory."""
    from mla_components.checkpointing import load_hf_checkpoint
    from mla_components.models import MLAConfig, llama_from_hf_config

    config, state = load_hf_checkpoint(Path(origin_dir))
    teacher = llama_from_hf_config(config)
    teacher.load_state_dict(state)
    teacher = teacher.to(device).eval()
    tokens = token_windows(hf_tokenizer(str(origin_dir)), "heldout", sequences, seq_len, seed=1)
    report = {}
    for name, directory in checkpoints.items():
        config, state = load_hf_checkpoint(Path(directory))
        if config.get("model_type") == "llama":
            student = llama_from_hf_config(config)
        else:
            student = mla(MLAConfig.from_hf_config(config, kernel_backend="torch"))
        student.load_state_dict(state)
        report[name] = compare_on_heldout(student.to(device).eval(), teacher, tokens)
        log.info("%s: %s", name, report[name])
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mla_components.conversion.pipeline",
        description="Held-out perplexity and next-token KL of MLA checkpoints against their origin (JSON on stdout).",
    )
    parser.add_argument("--origin", required=True, help="the origin as an HF Llama directory")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    print(json.dumps(heldout_report(args.origin, checkpoints, args.sequences, args.seq_len, args.device), indent=2))


if __name__ == "__main__":
    main()
