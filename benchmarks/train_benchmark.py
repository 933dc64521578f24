"""SFT throughput of the 1B models through the path users take (``tune run ... full_finetune_distributed``):
tokens/s per GPU, MFU, peak memory per GPU, and scaling efficiency across process counts.

    python benchmarks/train_benchmark.py --models mla_1b gqa_1b --nproc 1 --seq 8192 --json sft.json
    python benchmarks/train_benchmark.py --models mla_1b --nproc 1 2 4 8 --json scaling.json   # issue 9

Each run trains a fresh initialisation of the installed ``mla_recipes.configs`` ``<model>/sft_distributed.yaml``
(FSDP2, activation checkpointing, bf16, fixed per-GPU batch ``--batch`` (default 1) x ``seq`` tokens) on needle
data with the byte tokenizer (throughput does not depend on which tokenizer produced the ids; the model keeps its
128k vocabulary) and ``train_on_input`` (Torchtune's tokens/s counts supervised tokens only; with it, every one of
the ``seq`` tokens). Figures are medians over the steps after ``--warmup``. MFU counts model FLOPs only
(activation recomputation excluded):
``6 * matmul params + 3 * layers * heads * (qk_head_dim + v_head_dim) * seq`` per token (causal attention).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchtune.modules import TiedLinear

from mla_components.compat.torchtune import cpu_env

CONFIGS = files("mla_recipes.configs")  # the installed configs, not the checkout's: works from any directory
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def flops_per_token(model_name: str, seq: int) -> float:
    from mla_components import models

    with torch.device("meta"):
        model = getattr(models, model_name)()
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n)
    if isinstance(model.output, TiedLinear):  # the embedding is also the output projection
        matmul += model.tok_embeddings.weight.numel()
    attn = model.layers[0].attn
    heads = attn.num_heads
    qk = getattr(attn, "qk_head_dim", None) or attn.head_dim
    v = getattr(attn, "v_head_dim", None) or attn.head_dim
    return 6 * matmul + 3 * len(model.layers) * heads * (qk + v) * seq


def run_one(model_name: str, nproc: int, seq: int, batch: int, steps: int, root: Path, extra: list[str]) -> Path:
    out = root / f"{model_name}_n{nproc}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the log directory must hold this run's steps only
    samples = (steps + 2) * nproc * batch
    config = Path(str(CONFIGS / model_name / "sft_distributed.yaml"))
    # The 1B configs name the user's Llama-3 tokenizer files; the benchmark swaps in the byte tokenizer.
    present = OmegaConf.load(config)
    drop = [
        f"~{key}" for key in ("checkpointer.init_tokenizer_dir", "tokenizer.path") if OmegaConf.select(present, key)
    ]
    command = [
        sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", str(nproc),
        "full_finetune_distributed", "--config", str(config),
        f"output_dir={out}", f"checkpointer.checkpoint_dir={root / model_name / 'init'}",
        *drop, "tokenizer._component_=mla_components.data.byte_tokenizer", f"tokenizer.max_seq_len={seq}",
        f"dataset.context_tokens={seq}",
        f"dataset.num_samples={samples}", "dataset.needle_kinds=[passkey]", "dataset.train_on_input=True", "epochs=1",
        f"max_steps_per_epoch={steps}", "gradient_accumulation_steps=1", f"batch_size={batch}",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        "metric_logger.log_dir=" + str(out / "logs"), "log_peak_memory_stats=True", *extra,
    ]  # fmt: skip
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=cpu_env())
    return out / "logs"


def summarize(log_dir: Path, warmup: int) -> dict[str, float]:
    from mla_components.tracking import logged_metrics

    rows = [r for r in logged_metrics(log_dir) if "tokens_per_second_per_gpu" in r][warmup:]
    if not rows:
        raise RuntimeError(f"{log_dir}: no steps after warm-up")
    return {
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_second_per_gpu"] for r in rows),
        "peak_memory_alloc_gib": max(r.get("peak_memory_alloc", float("nan")) for r in rows),
        "steps_measured": len(rows),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mla_1b", "gqa_1b"])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("outputs/train_benchmark"))
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak per GPU (default: from the GPU name)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. compile=True")
    args = parser.parse_args(argv)

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    results = []
    for model_name in args.models:
        for nproc in args.nproc:
            logs = run_one(model_name, nproc, args.seq, args.batch, args.steps, args.root, args.overrides)
            stats = summarize(logs, args.warmup)
            stats["mfu"] = stats["tokens_per_s_per_gpu"] * flops_per_token(model_name, args.seq) / (peak * 1e12)
            results.append({"model": model_name, "nproc": nproc, "seq": args.seq, "batch": args.batch, **stats})
    for r in results:
        base = next(b for b in results if b["model"] == r["model"] and b["nproc"] == min(args.nproc))
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    print(
        f"\n{name}, seq {args.seq}, batch {args.batch}/GPU, FSDP2 + activation checkpointing, bf16 "
        f"({args.overrides or 'eager'})"
    )
    print("| model | GPUs | tokens/s/GPU | MFU | peak mem/GPU (GiB) | scaling eff. |\n|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['nproc']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_memory_alloc_gib']:.1f} | {r['scaling_efficiency']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_tflops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
