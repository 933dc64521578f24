"""The main job on the embedded default (CPU, ``mla_tiny``): ``mla-demo`` or ``python -m mla_components.main``.

At this stage it builds ``mla_tiny``, runs a prompt through cached (absorbed-MLA) generation, checks it against an
uncached forward pass, and prints the KV-cache table of the 1B models.
"""

import argparse
import time

import torch

from mla_components.generation import greedy_generate
from mla_components.kv_cache_report import allocated_kv_cache_bytes
from mla_components.kv_cache_report import main as kv_cache_table
from mla_components.models import mla_tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="The pass key is 31415. Remember it. What is the pass key?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = mla_tiny(kernel_backend="auto").eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1/2] mla_tiny: {n_params:,} parameters (random init, seed {args.seed})")

    prompt = torch.tensor(list(args.prompt.encode("utf-8")))  # byte ids: no tokenizer file needed
    start = time.perf_counter()
    tokens, logits = greedy_generate(model, prompt, args.max_new_tokens)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        reference = model(tokens[:, :-1])[:, prompt.numel() - 1 :]
    max_diff = (logits - reference).abs().max().item()
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=tokens.shape[1])
    cache_bytes = allocated_kv_cache_bytes(model)
    print(
        f"      generated {args.max_new_tokens} tokens with the latent KV cache in {elapsed:.2f}s; "
        f"max |cached - uncached| logit = {max_diff:.2e}"
    )
    print(
        f"      latent cache for {tokens.shape[1]} tokens: {cache_bytes:,} bytes "
        f"({cache_bytes // tokens.shape[1]:,} per token = 4 layers x 576 x fp32)"
    )
    print("[2/2] ", end="")
    kv_cache_table([])


if __name__ == "__main__":
    main()
