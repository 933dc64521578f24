"""Per-token decode latency of whole models at long context: mla_1b (triton / torch backends) vs gqa_1b.

    python benchmarks/benchmark_decode_e2e.py --contexts 32768 131072 --json e2e.json
    python benchmarks/benchmark_decode_e2e.py --contexts 1048576 --models mla_1b:triton mla_1b_fp8:triton

Random bf16 weights (speed does not depend on their values), batch 1. The caches are filled with random values
and their position advanced to the context length (a 128k prefill would only cost time and memory here), then one
decode step (token, position, mask over the whole cache as Torchtune's ``generate`` passes it) is timed: eagerly,
and replayed from a CUDA graph (what a serving loop would do). Median of ``--steps`` steps after warm-up.

Then the project's own greedy loop (``mla_components.decoding.cached_greedy_decode``, what the passkey evaluation
and ``chunked_prefill_greedy`` run after prefill) generates ``--steps`` tokens from the filled cache, eagerly and
with its default CUDA graph, wall clock including the per-token host read of the token (median of 5 runs, ms per
token), against the memory floor: the weights and the filled cache read once per token at the device's copy
bandwidth (measured in the same run).
Per token, MLA reads 18,432 B of cache per position (16 layers x 576 x 2 B), GQA 32,768 B; ``mla_1b_fp8`` (the
fp8 latent cache, ``kv_cache_dtype="fp8_e4m3"``) 10,496 B (16 x 656 B). Each row also reports the peak CUDA memory
allocated from the model's build to its last timed step.
"""

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch
from benchmark_mla import Timer, copy_bandwidth_gbps  # benchmarks/ is the script's sys.path[0]

from mla_components.compat.torchtune import kv_cache_without_host_check
from mla_components.decoding import CudaGraphStep, cached_greedy_decode
from mla_components.models import gqa_1b, mla_1b
from mla_components.modules import MLAKVCache


def build(name: str, max_seq_len: int) -> torch.nn.Module:
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            if name == "gqa_1b":
                model = gqa_1b(max_seq_len=max_seq_len)
            else:
                base, backend = name.split(":")
                cache = "fp8_e4m3" if base == "mla_1b_fp8" else "bf16"
                model = mla_1b(max_seq_len=max_seq_len, kernel_backend=backend, kv_cache_dtype=cache)
        finally:
            torch.set_default_dtype(torch.float32)
    return model.to("cuda").eval()  # some builders create buffers on the CPU explicitly


def fill_caches(model: torch.nn.Module, context: int) -> int:
    """Random cache contents for positions ``0 .. context-1``; returns the cache bytes per position."""
    per_position = 0
    for module in model.modules():
        if isinstance(module, MLAKVCache) and module.quantized:
            # random latents quantised as a prefill would write them (random bytes would hold NaN codes and scales)
            batch = module.cache.shape[0]
            for start in range(0, context, 16384):
                n = min(16384, context - start)
                c_kv = torch.randn(batch, n, module.kv_lora_rank, device="cuda", dtype=torch.bfloat16)
                module.update(c_kv, torch.randn(batch, n, module.rope_dim, device="cuda", dtype=torch.bfloat16))
            per_position += module.cache[0, 0].numel() * module.cache.element_size()
        elif isinstance(module, MLAKVCache):
            module.cache.normal_()
            module.cache_pos.add_(context)
            per_position += module.cache[0, 0].numel() * module.cache.element_size()
        elif hasattr(module, "k_cache") and hasattr(module, "cache_pos"):
            module.k_cache.normal_()
            module.v_cache.normal_()
            module.cache_pos.add_(context)
            per_position += 2 * module.k_cache[0, :, 0].numel() * module.k_cache.element_size()
    return per_position


def time_decode(model, context: int, steps: int, graph: bool) -> list[float]:
    max_seq = model.decoder_max_cache_seq_len
    token = torch.randint(0, 1000, (1, 1), device="cuda")
    input_pos = torch.tensor([[context]], device="cuda")
    mask = (torch.arange(max_seq, device="cuda") <= context).view(1, 1, max_seq)

    def step():
        return model(token, input_pos=input_pos, mask=mask)

    # the caches' overflow assertions read the fill level on the host, which capture forbids (see CudaGraphStep)
    with torch.no_grad(), kv_cache_without_host_check() if graph else contextlib.nullcontext():
        return Timer(steps, flush_l2=False)(step, graph=graph)


def time_greedy_loop(model, context: int, tokens: int, graph: bool, runs: int = 5) -> float:
    """Median over ``runs`` of the wall-clock ms per token of ``cached_greedy_decode`` from position ``context``."""
    step = CudaGraphStep(model, enabled=graph)
    cached_greedy_decode(model, 0, context, 4, step=step)  # warm-up; captures the graph
    per_token = []
    for _ in range(runs):
        fill_caches_position(model, context)
        torch.cuda.synchronize()
        start = time.perf_counter()
        cached_greedy_decode(model, 0, context, tokens, step=step)
        torch.cuda.synchronize()
        per_token.append((time.perf_counter() - start) * 1e3 / tokens)
    fill_caches_position(model, context)
    return statistics.median(per_token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--models", nargs="+", default=["mla_1b:triton", "mla_1b:torch", "gqa_1b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of one decode step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark_decode_e2e needs a CUDA device", file=sys.stderr)
        return 2
    copy_gbps = copy_bandwidth_gbps(Timer(10))
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)", flush=True)
    results = []
    for context in args.contexts:
        headroom = 3 * args.steps + 64  # each timed step advances the cache position by one (rewound after each)
        for name in args.models:
            torch.cuda.reset_peak_memory_stats()
            model = build(name, max_seq_len=context + headroom)
            with torch.device("cuda"):  # Torchtune's KVCache is allocated on the current default device
                model.setup_caches(batch_size=1, dtype=torch.bfloat16, decoder_max_seq_len=context + headroom)
            per_position = fill_caches(model, context)
            row = dict(model=name, context=context, cache_bytes_per_position=per_position,
                       cache_gb_read_per_token=per_position * context / 1e9)  # fmt: skip
            for mode in ("eager", "graph"):
                try:
                    row[f"{mode}_ms"] = statistics.median(time_decode(model, context, args.steps, mode == "graph"))
                except Exception as err:  # report, keep going (e.g. a capture that a host sync breaks)
                    row[f"{mode}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    torch.cuda.synchronize()
                # rewind: the timed steps advanced every cache position
                fill_caches_position(model, context)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            row["floor_ms"] = (weight_bytes + per_position * context) / (copy_gbps * 1e6)
            for mode in ("eager", "graph"):
                ms = time_greedy_loop(model, context, args.steps, graph=mode == "graph")
                row[f"loop_{mode}_ms_per_token"] = ms
                row[f"loop_{mode}_vs_floor"] = ms / row["floor_ms"]
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if args.profile and name == args.models[0] and context == args.contexts[-1]:
                profile_step(model, context)
                fill_caches_position(model, context)
            print(json.dumps(row), flush=True)
            results.append(row)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=copy_gbps, rows=results), f, indent=1)
    return 0


def profile_step(model, context: int) -> None:
    """Top GPU kernels (self CUDA time) of three eager decode steps of the first model at the last context."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_decode(model, context, steps=3, graph=False)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))


def fill_caches_position(model: torch.nn.Module, context: int) -> None:
    """Set every cache's position back to ``context``."""
    for module in model.modules():
        if hasattr(module, "cache_pos") and (isinstance(module, MLAKVCache) or hasattr(module, "k_cache")):
            module.cache_pos.copy_(torch.arange(context, context + module.cache_pos.numel(), device="cuda"))


if __name__ == "__main__":
    raise SystemExit(main())
