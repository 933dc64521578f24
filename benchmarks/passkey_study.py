"""Passkey study (issue 5, GPU): ``mla_tiny`` and its GQA twin ``gqa_tiny`` trained with the same SFT config, data
and budget, then evaluated side by side from 1k tokens to the longest context in the grid.

    python benchmarks/passkey_study.py --steps 2000 --context 4096 --batch 16

Every step is the command a user would type (printed before it runs): Torchtune's ``full_finetune_distributed``
with ``configs/<model>/sft_distributed.yaml`` (one process, ``device=cuda dtype=bf16``, passkey needles only), then
``tune run mla_recipes/passkey_eval.py --config configs/mla_tiny/passkey_long_context.yaml``. Results land in
``--root`` (``eval/summary.txt``, ``eval/heatmap.png``, ``eval/results.json``). Measured runs and what they show:
``docs/results/passkey.md``.
"""

import argparse
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from mla_components.compat.torchtune import cpu_env

CONFIGS = files("mla_recipes.configs")  # the installed configs, not the checkout's: works from any directory
MODELS = ("mla_tiny", "gqa_tiny")  # the models of configs/mla_tiny/passkey_long_context.yaml
TUNE = [sys.executable, "-m", "torchtune._cli.tune", "run"]


def _run(command: list[str]) -> float:
    print("$ " + " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=cpu_env())
    return time.perf_counter() - start


def train(model: str, args: argparse.Namespace) -> float:
    out = args.root / model
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the log directory must hold this run's steps only
    return _run([
        *TUNE, "--nproc_per_node", "1", "full_finetune_distributed",
        "--config", str(CONFIGS / model / "sft_distributed.yaml"),
        f"output_dir={out}", f"checkpointer.checkpoint_dir={args.root / (model + '_init')}",
        f"checkpointer.output_dir={out}", f"device={args.device}", f"dtype={args.dtype}",
        f"tokenizer.max_seq_len={args.context}", f"dataset.context_tokens={args.context}",
        "dataset.needle_kinds=[passkey]", f"dataset.num_samples={args.steps * args.batch}",
        f"batch_size={args.batch}", "epochs=1", f"max_steps_per_epoch={args.steps}",
        f"optimizer.lr={args.lr}", f"lr_scheduler.num_warmup_steps={args.steps // 20}", "log_every_n_steps=50",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", f"metric_logger.log_dir={out}/logs",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--context", type=int, default=4096, help="training context, in tokens")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--root", type=Path, default=Path("outputs/passkey_study"))
    parser.add_argument("eval_overrides", nargs="*", help="key=value overrides of the evaluation config")
    args = parser.parse_args(argv)
    args.root = args.root.resolve()
    seconds = {model: train(model, args) for model in MODELS}
    for model, s in seconds.items():
        print(f"{model}: {args.steps} steps x {args.batch} x {args.context} tokens in {s:.0f} s", flush=True)
    _run([
        *TUNE, "mla_recipes/passkey_eval.py", "--config", str(CONFIGS / "mla_tiny" / "passkey_long_context.yaml"),
        f"study_root={args.root}", f"device={args.device}", f"dtype={args.dtype}", *args.eval_overrides,
    ])  # fmt: skip
    print((args.root / "eval" / "summary.txt").read_text())


if __name__ == "__main__":
    main()
