"""The main job on the embedded default (CPU, ``mla_tiny``): ``mla-demo`` or ``python -m mla_components.main``.

The whole product path in a few minutes on a laptop, with the commands a user would type:

1. build ``mla_tiny``; cached (absorbed-MLA) generation must equal an uncached forward pass;
2. SFT on needle-in-a-haystack data: Torchtune's FSDP2 recipe, 2 processes, gloo;
3. DPO from the last SFT epoch: Torchtune's DPO recipe;
4. export of the DPO model as a servable HF DeepseekV3 directory (what vLLM and ``k8s/`` serve);
5. the KV-cache table of the 1B models;
6. passkey evaluation of SFT vs DPO side by side: accuracy heatmap over context length x needle depth.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from mla_components.checkpointing import epoch_dirs
from mla_components.generation import greedy_generate
from mla_components.kv_cache_report import allocated_kv_cache_bytes
from mla_components.kv_cache_report import main as kv_cache_table
from mla_components.models import mla_tiny
from mla_components.torchtune_compat import cpu_env

STEPS = 6
CACHED_LOGIT_TOLERANCE = 1e-4  # fp32: the absorbed (cached) and expanded (uncached) paths agree to ~1e-6


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)


def _tune(args: list[str]) -> None:
    """``mla-tune run ...`` in a subprocess, its progress bars streaming to the terminal."""
    command = [sys.executable, "-m", "mla_components.cli", "run", *args]
    print("      $ mla-tune run " + shlex.join(args), flush=True)
    subprocess.run(command, check=True, env=cpu_env({"OMP_NUM_THREADS": "1", **os.environ}))


def last_epoch(output_dir: Path) -> Path:
    """The newest complete ``epoch_N`` directory a training run wrote."""
    epochs = epoch_dirs(output_dir, resumable=False)
    if not epochs:
        raise SystemExit(f"{output_dir} holds no complete epoch_N directory: the training step did not finish")
    return epochs[-1][1]


def check_cached_generation(prompt: str, max_new_tokens: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = mla_tiny(kernel_backend="auto").eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      mla_tiny: {n_params:,} parameters (random init, seed {seed})")
    tokens_in = torch.tensor(list(prompt.encode("utf-8")))
    start = time.perf_counter()
    tokens, logits = greedy_generate(model, tokens_in, max_new_tokens)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        reference = model(tokens[:, :-1])[:, tokens_in.numel() - 1 :]
    max_diff = (logits - reference).abs().max().item()
    if not max_diff <= CACHED_LOGIT_TOLERANCE:
        raise SystemExit(
            f"cached generation disagrees with the uncached forward pass: max logit difference {max_diff:.2e} > "
            f"{CACHED_LOGIT_TOLERANCE:.0e}"
        )
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=tokens.shape[1])
    cache_bytes = allocated_kv_cache_bytes(model)
    print(
        f"      generated {max_new_tokens} tokens with the latent KV cache in {elapsed:.2f}s; "
        f"max |cached - uncached| logit = {max_diff:.2e}\n"
        f"      latent cache for {tokens.shape[1]} tokens: {cache_bytes:,} bytes "
        f"({cache_bytes // tokens.shape[1]:,} per token = 4 layers x 576 x fp32)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where every stage writes")
    parser.add_argument("--prompt", default="The pass key is 31415. Remember it. What is the pass key?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="training processes (gloo on CPU)")
    args = parser.parse_args(argv)
    out = args.output.resolve()

    _step(1, "mla_tiny: cached generation over the latent KV cache")
    check_cached_generation(args.prompt, args.max_new_tokens, args.seed)

    _step(2, "SFT on needle-in-a-haystack data (Torchtune full_finetune_distributed, FSDP2, gloo)")
    _tune([
        "--nproc_per_node", str(args.nproc), "full_finetune_distributed", "--config", "mla_tiny/sft_distributed",
        f"output_dir={out / 'sft'}", f"checkpointer.checkpoint_dir={out / 'init'}",
    ])  # fmt: skip
    sft = last_epoch(out / "sft")

    _step(3, "DPO against needle hallucinations (Torchtune full_dpo_distributed)")
    _tune([
        "--nproc_per_node", str(args.nproc), "full_dpo_distributed", "--config", "mla_tiny/dpo_distributed",
        f"output_dir={out / 'dpo'}", f"checkpointer.checkpoint_dir={sft}",
    ])  # fmt: skip
    dpo = last_epoch(out / "dpo")

    _step(4, "export for serving (HF DeepseekV3 directory: transformers, vLLM, k8s/)")
    from mla_components.export import export_checkpoint

    exported = export_checkpoint(dpo, out / "export", dtype="float32", overwrite=True)
    print(f"      python -m mla_components.export --checkpoint {dpo} --output {exported} --dtype float32 --overwrite")
    print(f"      serve it: python -m vllm.entrypoints.openai.api_server --model {exported}  (docs/serving.md)")

    _step(5, "KV-cache bytes of the 1B models, measured from allocated cache tensors")
    kv_cache_table([])

    _step(6, "passkey evaluation, SFT vs DPO side by side (context length x needle depth)")
    from mla_components.evaluation.passkey import evaluate_checkpoints

    grid = dict(context_lengths=[512, 1024], depths=[0.0, 0.5, 1.0], trials_per_cell=2)
    paths = evaluate_checkpoints({"mla_tiny_sft": sft, "mla_tiny_dpo": dpo}, out / "passkey_eval", **grid)
    print(f"\nEverything is under {out}: sft/ dpo/ (HF epoch directories, logs, W&B offline run, MLflow store "
          f"{out / 'sft' / 'mlflow.db'}), export/, passkey_eval/")  # fmt: skip
    print(f"The passkey heatmap: {paths['heatmap']}")


if __name__ == "__main__":
    main()
