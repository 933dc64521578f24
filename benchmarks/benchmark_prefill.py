"""Long-context prefill: the attention of one MLA prefill chunk per SDPA kernel, and whole models prefilling in chunks.

    python benchmarks/benchmark_prefill.py chunk --contexts 131072 1048576 --json chunk.json
    python benchmarks/benchmark_prefill.py model --models smollm2_135m_mla mla_1b gqa_1b --contexts 131072 1048576 \
        --json model.json

``chunk``: the last chunk of a causal prefill (``--chunk`` queries, the last of ``context`` positions, against all
``context`` keys), with the shapes an MLA layer hands SDPA after expanding its latent (``--heads``, query/key
``--qk-dim`` = nope + rope, value ``--v-dim``; default SmolLM2-135M's 9 x (64 + 64) and 64) and the lower-right
``CausalBias`` it passes. Rows:
- ``sdpa_default``: SDPA's own choice, what ``MultiHeadLatentAttention`` runs. PyTorch's flash kernel needs query, key
  and value of one width, so with a narrower value a lower-right ``CausalBias`` goes to the memory-efficient kernel.
- ``efficient``: that kernel forced.
- ``flash_v_padded``: the flash kernel forced, the value zero-padded to the query/key width and the extra output
  columns dropped (the result is the same attention; the kernel does 2 x 2 x qk FLOP per pair where 2 x (qk + v) are
  needed, and TFLOP/s counts the needed ones).
A kernel SDPA refuses for these inputs is reported with its reason (with a forced kernel that cannot take the
lower-right mask, PyTorch would build the whole ``[chunk, context]`` boolean mask, so only these rows are run).
Each measured row gives ``max_abs_diff`` against ``sdpa_default``'s output. Median of ``--repeats``; TFLOP/s counts
2 x (qk + v) FLOP per attended query-key pair and head; ``prefill_attention_s`` extrapolates the row's rate to the
attention of a whole causal prefill of ``context`` tokens through ``--layers`` layers (default SmolLM2-135M's 30).

``model``: random weights (speed and memory do not depend on their values), batch 1, a random prompt of ``context``
tokens through the project's own ``chunked_prefill_greedy`` (the passkey evaluation's prefill, ``--prefill-chunk``),
after an untimed prefill of two chunks that compiles what runs; then ``--new-tokens`` tokens through
``cached_greedy_decode`` with a decode step captured beforehand (on CUDA a CUDA graph, as the evaluation runs it):
prefill seconds, decode ms per token, KV-cache bytes and peak device memory from the model's build on (CUDA only).
A model that runs out of memory at a length gets a row that says so.

bf16 on CUDA, fp32 on the CPU (where the sizes must be small: the tests run ``mla_tiny`` this way).
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torchtune import training

from mla_components.decoding import CudaGraphStep, cached_greedy_decode, chunked_prefill_greedy
from mla_components.kv_cache_report import allocated_kv_cache_bytes
from mla_components.models import gqa_1b, gqa_tiny, mla_1b, mla_tiny, smollm2_135m_mla

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "mla_tiny": lambda n: mla_tiny(max_seq_len=n),
    "gqa_tiny": lambda n: gqa_tiny(max_seq_len=n),
    "mla_1b": lambda n: mla_1b(max_seq_len=n),
    "gqa_1b": lambda n: gqa_1b(max_seq_len=n),
    "smollm2_135m_mla": lambda n: smollm2_135m_mla(max_seq_len=n),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(op: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Wall seconds of ``op`` with the device synchronised around each call; median of ``repeats``."""
    for _ in range(warmup):
        op()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        op()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attended_pairs(queries: int, keys: int) -> int:
    """Query-key pairs of ``queries`` causal queries that are the last of ``keys`` positions."""
    return queries * (keys - queries) + queries * (queries + 1) // 2


def chunk_rows(
    context: int, chunk: int, heads: int, qk_dim: int, v_dim: int, layers: int, device: torch.device, repeats: int
) -> list[dict]:
    """One row per way of running the chunk's attention (see the module docstring)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, chunk, qk_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, heads, context, qk_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(1, heads, context, v_dim, generator=gen, device=device, dtype=dtype)
    bias = causal_lower_right(chunk, context)
    scale = qk_dim**-0.5
    flops_per_pair = heads * 2 * (qk_dim + v_dim)
    flops = attended_pairs(chunk, context) * flops_per_pair
    prefill_flops = attended_pairs(context, context) * flops_per_pair * layers

    def attend(values: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, values, attn_mask=bias, scale=scale)[..., :v_dim]

    reference = None
    ways: list[tuple[str, SDPBackend | None, torch.Tensor]] = [
        ("sdpa_default", None, v),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION, v),
        ("flash_v_padded", SDPBackend.FLASH_ATTENTION, F.pad(v, (0, qk_dim - v_dim))),
    ]
    rows = []
    for name, kernel, values in ways:
        row = {"way": name, "context": context, "chunk": chunk, "heads": heads, "qk_dim": qk_dim, "v_dim": v_dim}
        try:
            with warnings.catch_warnings(record=True) as caught:  # SDPA says why it refuses a kernel as a warning
                warnings.simplefilter("always")
                with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
                    out = attend(values)
                    seconds = median_seconds(lambda values=values: attend(values), device, repeats)
        except RuntimeError as error:  # a kernel these inputs do not fit
            reasons = [str(w.message).split(" (Triggered")[0] for w in caught] or [str(error).splitlines()[0]]
            rows.append({**row, "skipped": "; ".join(dict.fromkeys(reasons))[:400]})
            continue
        if reference is None:
            reference = out
        rows.append(
            {
                **row,
                "ms": seconds * 1e3,
                "tflops": flops / seconds / 1e12,
                "prefill_attention_s": prefill_flops / (flops / seconds),
                "max_abs_diff": float((out.float() - reference.float()).abs().max()),
            }
        )
    return rows


def model_row(
    name: str, context: int, prefill_chunk: int, new_tokens: int, device: torch.device, seed: int = 0
) -> dict:
    """Chunked prefill of a random ``context``-token prompt, then greedy decode of ``new_tokens`` tokens."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup_tokens = 2  # the decode step's eager call and its capture
    cache_len = context + warmup_tokens + new_tokens + 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    with torch.device(device), training.set_default_dtype(dtype):
        model = BUILDERS[name](cache_len)
    model = model.to(device).eval()
    with torch.device(device):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=cache_len)
    vocab = model.tok_embeddings.num_embeddings
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(seed)).tolist()
    chunked_prefill_greedy(model, prompt[: 2 * prefill_chunk], 1, prefill_chunk=prefill_chunk)  # compiles, untimed
    _sync(device)
    start = time.perf_counter()
    first = chunked_prefill_greedy(model, prompt, 1, prefill_chunk=prefill_chunk)
    _sync(device)
    prefill_s = time.perf_counter() - start
    step = CudaGraphStep(model)  # captured in the untimed tokens, replayed in the timed ones
    warm = cached_greedy_decode(model, first[0], context, warmup_tokens, step=step)
    _sync(device)
    start = time.perf_counter()
    generated = cached_greedy_decode(model, warm[-1], context + warmup_tokens, new_tokens, step=step)
    _sync(device)
    decode_s = time.perf_counter() - start
    row = {
        "model": name,
        "context": context,
        "prefill_chunk": prefill_chunk,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": context / prefill_s,
        "decode_ms_per_token": decode_s / len(generated) * 1e3,
        "kv_cache_bytes": allocated_kv_cache_bytes(model),
    }
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del model
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    chunk = sub.add_parser("chunk", help="one prefill chunk's attention, per SDPA kernel")
    chunk.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    chunk.add_argument("--chunk", type=int, default=32768)
    chunk.add_argument("--heads", type=int, default=9)
    chunk.add_argument("--qk-dim", type=int, default=128)
    chunk.add_argument("--v-dim", type=int, default=64)
    chunk.add_argument("--layers", type=int, default=30, help="layers the prefill estimate counts")
    chunk.add_argument("--repeats", type=int, default=3)
    model = sub.add_parser("model", help="whole models: chunked prefill, then greedy decode")
    model.add_argument("--models", nargs="+", default=["smollm2_135m_mla", "mla_1b", "gqa_1b"], choices=BUILDERS)
    model.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    model.add_argument("--prefill-chunk", type=int, default=32768)
    model.add_argument("--new-tokens", type=int, default=32)
    for p in (chunk, model):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    if args.mode == "chunk":
        if args.v_dim > args.qk_dim:
            parser.error(f"--v-dim ({args.v_dim}) must be <= --qk-dim ({args.qk_dim})")
        for context in args.contexts:
            if not 1 <= args.chunk <= context:
                parser.error(f"--chunk ({args.chunk}) must be between 1 and each context ({context})")
            rows += chunk_rows(
                context, args.chunk, args.heads, args.qk_dim, args.v_dim, args.layers, device, args.repeats
            )
    else:
        for context in args.contexts:
            for name in args.models:
                try:
                    rows.append(model_row(name, context, args.prefill_chunk, args.new_tokens, device))
                except torch.OutOfMemoryError as error:  # the table says which model could not reach a length
                    rows.append({"model": name, "context": context, "skipped": str(error).splitlines()[0][:200]})
                    torch.cuda.empty_cache()
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"mode": args.mode, "device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
