"""MLA decode attention on one GPU: naive PyTorch vs absorbed PyTorch vs the fused Triton kernel.

    python benchmarks/benchmark_mla.py --json results.json         # the table of docs/results/kernels.md
    python benchmarks/benchmark_mla.py --sweep --json sweep.json   # stage-1 launch configs, per shape
    python benchmarks/benchmark_mla.py --fp8 --json fp8.json       # Triton over the bf16 vs the fp8 cache
    python benchmarks/benchmark_mla.py --host-overhead --json host.json  # host µs per eager call vs Triton's launch
    python benchmarks/benchmark_mla.py --host-python                     # all Python of a call (CPU, driver stubbed)
    python benchmarks/benchmark_mla.py --compile-report --json c.json    # the compiler's view for an H100/H200 (CPU)

Measures the device-to-device copy bandwidth first (bytes read + bytes written), then for H in {16, 128}, bf16,
latent 512 + rope 64, and B x L in {1x4k, 1x32k, 1x128k, 8x32k, 32x16k, 128x4k} times one decode step of:

- ``naive``: decompress the latent with ``kv_b_proj``'s weight into per-head K/V, then SDPA (the seed's baseline);
- ``absorbed``: scores against the latent cache in PyTorch (the module's ``torch`` backend);
- ``triton``: ``mla_kernels.mla_decode`` (split-KV flash-decode + reduction).

Each op ends at the latent (or, for naive, per-head) attention output; the ``W_UV`` product after it is the same
small matmul for both absorbed paths and is not timed. Bytes = latent cache + queries + latent output (the floor
every method has to move). Times: CUDA events around each call, L2 flushed before each, median of ``--repeats``.
Every method is replayed from a CUDA graph (as a serving loop runs decode steps; this removes Python and launch
overhead, which would otherwise dominate the small shapes); ``triton_eager_ms`` in the JSON is the kernel
launched eagerly from Python. ``--graph-max-tokens`` limits graphs to shapes with at most that many cached tokens.

``--fp8`` times the Triton kernel over the same cache stored both ways, side by side in one run (default: H=16,
1x128k, 8x32k, 128x4k): the bf16 rows (1,152 B per token) and FlashMLA's fp8 rows (656 B: e4m3 latent, fp32 scale
per 128 values, bf16 rope key; ``MLAKVCache``'s layout), each with its own byte count, and the speedup
``bf16_ms / fp8_ms``. The fp8 output is first checked against the absorbed PyTorch path over the dequantised cache.
``fp8_reload`` rows load each fp8 group tile a second time for the P·V product (``DecodeConfig.fp8_reload``).

``--compile-report`` needs no GPU: it compiles the stage-1 kernel each variant would launch on an sm90 GPU with 132
SMs (H100/H200; ``--sms``) through Triton's own pipeline on this machine and prints what the compiler made of it
(registers and spills per thread, shared memory, which loads go through the ``cp.async`` pipeline, MMA kinds) for
the same shapes and variants as ``--fp8`` (default), or with ``--heads 128`` the bf16 kernel's configs.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from mla_components.modules.attention import absorbed_attention_torch
from mla_kernels.fp8 import FP8_GROUP_SIZE, fp8_row_views, quantize_latent_fp8
from mla_kernels.mla_decode import (
    DecodeConfig,
    choose_num_splits,
    decode_bytes,
    decode_flops,
    decode_workspace,
    default_config,
    last_stage1_report,
    mla_decode,
    num_sms,
    stage1_compile_report,
)
from mla_kernels.reference import naive_decode_torch

SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 32768), (32, 16384), (128, 4096)]
HOST_SHAPES = [(1, 256), (1, 4096)]  # a short cache (4 splits) and a longer one (64 splits): two launches each
HOST_CALLS = 200
FP8_SHAPES = [(1, 131072), (8, 32768), (128, 4096)]  # issue 18: where bytes dominate, and the FlashMLA anchor
D_C, D_R, D_N, D_V = 512, 64, 128, 128
MAX_ABS_DIFF_BF16 = 0.05  # measured: <= 0.003 on every shape (docs/results/kernels.md)
SOFTMAX_SCALE = (D_N + D_R) ** -0.5
FP8_SWEEP_CONFIGS = [
    DecodeConfig(block_h=16, block_n=n, num_warps=w, num_stages=st, ctas_per_sm=c, fp8_mma=mma, fp8_reload=reload)
    for reload in (False, True)
    for mma in ("fp16", "bf16")
    for n, w, st, c in ((32, 4, 3, 1), (32, 4, 3, 2), (64, 4, 2, 1), (64, 8, 3, 1), (16, 4, 4, 2))
]
SWEEP_CONFIGS = [
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=2, ctas_per_sm=2),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=2),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=4, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=2, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=2, ctas_per_sm=4),
    DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=4, ctas_per_sm=2),
    DecodeConfig(block_h=32, block_n=32, num_warps=4, num_stages=2, ctas_per_sm=2),
    DecodeConfig(block_h=32, block_n=32, num_warps=8, num_stages=2, ctas_per_sm=2),
    DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, ctas_per_sm=1),
]
# second round, around the first round's winners (one head block)
EXTENDED_CONFIGS = [
    DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=3, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=3, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=32, num_warps=8, num_stages=3, ctas_per_sm=2),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=3),
    DecodeConfig(block_h=16, block_n=128, num_warps=8, num_stages=2, ctas_per_sm=1),
    DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=2, ctas_per_sm=2),
    DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=2, ctas_per_sm=1, min_split_tokens=64),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, ctas_per_sm=2, min_split_tokens=64),
]


class Timer:
    """Device times (ms) of a zero-argument op, eager or replayed from a CUDA graph; with ``flush_l2`` the L2 is
    flushed before every call (a kernel benchmark), without it caches stay warm as in a serving loop."""

    def __init__(self, repeats: int, warmup: int = 3, flush_l2: bool = True) -> None:
        self.repeats, self.warmup = repeats, warmup
        # > 50 MB L2
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if flush_l2 else None

    def __call__(self, op, graph: bool = False) -> list[float]:
        for _ in range(self.warmup):
            op()
        run = op
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                op()  # allocations for the capture pool
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                op()
            run = cuda_graph.replay
            run()
        times = []
        torch.cuda.synchronize()
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


def copy_bandwidth_gbps(timer: Timer, gib: float = 2.0) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (GB/s = 1e9 B/s)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = statistics.median(timer(lambda: dst.copy_(src)))
    return 2 * gib * 2**30 / (ms * 1e-3) / 1e9


def make_problem(batch: int, length: int, heads: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(batch, length, D_C + D_R, generator=gen, **bf16)
    q_nope = torch.randn(batch, 1, heads, D_N, generator=gen, **bf16)
    q_pe = torch.randn(batch, 1, heads, D_R, generator=gen, **bf16)
    kv_b_weight = torch.randn(heads * (D_N + D_V), D_C, generator=gen, **bf16) * D_C**-0.5
    w_uk = kv_b_weight.view(heads, D_N + D_V, D_C)[:, :D_N]
    q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk).contiguous()
    return dict(
        c_kv=cache[..., :D_C],
        k_pe=cache[..., D_C:],
        q_nope=q_nope,
        q_pe=q_pe,
        q_latent=q_latent,
        kv_b_weight=kv_b_weight,
        seq_lens=torch.full((batch,), length, dtype=torch.int32, device="cuda"),
    )


def ops(p: dict, config: DecodeConfig | None = None) -> dict:
    b, _, h, _ = p["q_latent"].shape
    q_lat, q_pe = p["q_latent"].view(b, h, D_C), p["q_pe"].reshape(b, h, D_R)
    return {
        "naive": lambda: naive_decode_torch(
            p["q_nope"], p["q_pe"], p["c_kv"], p["k_pe"], p["kv_b_weight"], SOFTMAX_SCALE
        ),
        "absorbed": lambda: absorbed_attention_torch(
            p["q_latent"], p["q_pe"], p["c_kv"], p["k_pe"], None, SOFTMAX_SCALE
        ),
        "triton": lambda: mla_decode(q_lat, q_pe, p["c_kv"], p["k_pe"], p["seq_lens"], SOFTMAX_SCALE, config=config)[0],
    }


def naive_bytes_needed(batch: int, length: int, heads: int) -> int:
    """Peak extra memory of the naive path: decompressed K/V, K with rope, and SDPA's copies (bf16)."""
    return batch * length * heads * (D_N + D_V + D_N + D_R) * 2 * 2


def run_table(args, timer: Timer, copy_gbps: float) -> list[dict]:
    rows = []
    free_bytes = torch.cuda.mem_get_info()[0]
    for heads in args.heads:
        for batch, length in args.shapes:
            p = make_problem(batch, length, heads)
            nbytes = decode_bytes(batch * length, batch, heads, D_C, D_R, 2)
            graph = batch * length <= args.graph_max_tokens
            row = dict(heads=heads, batch=batch, length=length, bytes=nbytes, graphed=graph,
                       flops=decode_flops(batch * length, heads, D_C, D_R))  # fmt: skip
            candidates = ops(p)
            # correctness on the benchmarked data: triton vs the absorbed PyTorch path
            t_out = candidates["triton"]().float()
            a_out = candidates["absorbed"]().view(batch, heads, D_C).float()
            row["max_abs_diff_vs_absorbed"] = (t_out - a_out).abs().max().item()
            # a wrong kernel must not print speedups: bf16 outputs of two correct paths agree to ~1e-2
            if not row["max_abs_diff_vs_absorbed"] <= MAX_ABS_DIFF_BF16:
                raise AssertionError(
                    f"H={heads} {batch}x{length}: Triton differs from absorbed PyTorch by "
                    f"{row['max_abs_diff_vs_absorbed']:.3g} > {MAX_ABS_DIFF_BF16}"
                )
            row["stage1_compiled"] = last_stage1_report()
            row["triton_config"] = asdict(default_config(heads, batch, num_sms(torch.device("cuda")), length))
            if graph and "triton" in args.methods:
                timer.repeats = args.repeats
                row["triton_eager_ms"] = statistics.median(timer(candidates["triton"], graph=False))
            for name in args.methods:
                if name == "naive" and naive_bytes_needed(batch, length, heads) > 0.8 * free_bytes:
                    row[name] = None
                    row[f"{name}_note"] = f"skipped: needs ~{naive_bytes_needed(batch, length, heads) / 1e9:.0f} GB"
                    continue
                reps = max(5, args.repeats // 5) if name == "naive" else args.repeats
                timer.repeats = reps
                try:
                    ms = statistics.median(timer(candidates[name], graph=graph))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row[name], row[f"{name}_note"] = None, "out of memory"
                    continue
                row[name] = dict(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9)
                row[name]["pct_copy"] = 100 * row[name]["gbps"] / copy_gbps
                torch.cuda.empty_cache()
            if row.get("triton"):
                for base in ("naive", "absorbed"):
                    if row.get(base):
                        row[f"speedup_vs_{base}"] = row[base]["ms"] / row["triton"]["ms"]
            rows.append(row)
            print_row(row)
            del p, candidates
            torch.cuda.empty_cache()
    return rows


def fp8_cache(p: dict) -> dict:
    """The problem's cache in ``MLAKVCache``'s fp8 rows: one uint8 ``[B, L, 656]`` buffer and its three views."""
    values, scale = quantize_latent_fp8(p["c_kv"])
    rope = p["k_pe"].contiguous()
    rows = torch.cat([values.view(torch.uint8), scale.view(torch.uint8), rope.view(torch.uint8)], dim=-1)
    del values, scale, rope
    return _fp8_layout(rows)


def _fp8_layout(rows: torch.Tensor) -> dict:
    c_kv, c_kv_scale, k_pe = fp8_row_views(rows, D_C)
    return dict(rows=rows, c_kv=c_kv, c_kv_scale=c_kv_scale, k_pe=k_pe)


def fp8_variants(base: DecodeConfig) -> dict[str, DecodeConfig]:
    """The default fp8 config with each group tile loaded twice, so that every fp8 load is pipelined (4 and 8
    warps: 185 and 128 registers per thread in ``--compile-report``, against 255 with one load)."""
    return {
        "fp8_reload": replace(base, fp8_reload=True),
        "fp8_reload_8warps": replace(base, fp8_reload=True, num_warps=8),
    }


def fp8_ops(p: dict, f: dict, sweep: bool = False) -> dict:
    """The kernel over the bf16 cache and over its fp8 copy ``f`` (same queries and lengths): ``fp8`` with the
    default config (fp16 MMAs), ``fp8_mma_bf16`` with it but bf16 MMAs, the :func:`fp8_variants`, and with
    ``sweep`` every config of ``FP8_SWEEP_CONFIGS`` as ``fp8_sweep_<i>``."""
    b, _, h, _ = p["q_latent"].shape
    q_lat, q_pe = p["q_latent"].view(b, h, D_C), p["q_pe"].reshape(b, h, D_R)
    base = default_config(h, b, num_sms(q_lat.device), p["c_kv"].shape[1], fp8=True)
    configs = {"fp8": None, "fp8_mma_bf16": replace(base, fp8_mma="bf16"), **fp8_variants(base)}
    if sweep:
        configs.update({f"fp8_sweep_{i}": config for i, config in enumerate(FP8_SWEEP_CONFIGS)})

    def fp8(config):
        return lambda: mla_decode(
            q_lat, q_pe, f["c_kv"], f["k_pe"], p["seq_lens"], SOFTMAX_SCALE, c_kv_scale=f["c_kv_scale"], config=config
        )[0]

    ops = {"bf16": lambda: mla_decode(q_lat, q_pe, p["c_kv"], p["k_pe"], p["seq_lens"], SOFTMAX_SCALE)[0]}
    ops.update({name: fp8(config) for name, config in configs.items()})
    return ops


def run_fp8(args, timer: Timer, copy_gbps: float) -> list[dict]:
    """Triton over the bf16 cache and over the fp8 cache of the same values, per shape, side by side."""
    rows = []
    timer.repeats = args.repeats
    for heads in args.heads:
        for batch, length in args.shapes:
            p = make_problem(batch, length, heads)
            f = fp8_cache(p)
            candidates = fp8_ops(p, f, sweep=args.fp8_sweep)
            # a wrong kernel must not print speedups: each fp8 variant vs absorbed PyTorch over the same fp8 values
            want = absorbed_attention_torch(
                p["q_latent"], p["q_pe"], f["c_kv"], f["k_pe"], None, SOFTMAX_SCALE, c_kv_scale=f["c_kv_scale"]
            ).view(batch, heads, D_C)
            reference_bf16 = candidates["bf16"]().float()
            row = dict(heads=heads, batch=batch, length=length, graphed=batch * length <= args.graph_max_tokens)
            row["triton_config"] = asdict(default_config(heads, batch, num_sms(torch.device("cuda")), length))
            row["fp8_config"] = asdict(default_config(heads, batch, num_sms(torch.device("cuda")), length, fp8=True))
            row["fp8_sweep_configs"] = [asdict(c) for c in FP8_SWEEP_CONFIGS] if args.fp8_sweep else []
            for name, op in candidates.items():
                if name != "bf16":
                    got = op().float()
                    diff = (got - want.float()).abs().max().item()
                    if not diff <= MAX_ABS_DIFF_BF16:
                        raise AssertionError(
                            f"H={heads} {batch}x{length}: {name} Triton differs from absorbed PyTorch by {diff:.3g} "
                            f"> {MAX_ABS_DIFF_BF16}"
                        )
                    row[f"{name}_max_abs_diff_vs_absorbed"] = diff
                    # the quantisation itself, for the record: fp8 kernel vs bf16 kernel
                    row[f"{name}_max_abs_diff_vs_bf16"] = (got - reference_bf16).abs().max().item()
                    del got
                nbytes = decode_bytes(batch * length, batch, heads, D_C, D_R, 2, fp8_cache=name != "bf16")
                ms = statistics.median(timer(op, graph=row["graphed"]))
                gbps = nbytes / (ms * 1e-3) / 1e9
                row[name] = dict(ms=ms, bytes=nbytes, gbps=gbps, pct_copy=100 * gbps / copy_gbps)
                row[name]["compiled"] = last_stage1_report()
                row[f"speedup_{name}_vs_bf16"] = row["bf16"]["ms"] / ms
            del want, reference_bf16
            rows.append(row)
            cells = " | ".join(
                f"{n} {row[n]['ms'] * 1e3:7.1f} us ({row['bf16']['ms'] / row[n]['ms']:4.2f}x)" for n in candidates
            )
            print(f"H={heads:3d} {batch:3d}x{length:6d} graph={row['graphed']} | {cells}", flush=True)
            del p, f, candidates
            torch.cuda.empty_cache()
    return rows


def run_sweep(args, timer: Timer, copy_gbps: float) -> list[dict]:
    results = []
    timer.repeats = args.repeats
    for heads in args.heads:
        for batch, length in args.shapes:
            p = make_problem(batch, length, heads)
            nbytes = decode_bytes(batch * length, batch, heads, D_C, D_R, 2)
            for cfg in EXTENDED_CONFIGS if args.extended else SWEEP_CONFIGS:
                if cfg.block_h > max(16, heads):
                    continue
                try:
                    ms = statistics.median(timer(ops(p, cfg)["triton"], graph=batch * length <= args.graph_max_tokens))
                except Exception as err:  # a config that does not compile (shared memory) is skipped
                    error = f"{type(err).__name__}: {str(err)[:200]}"
                    results.append(dict(heads=heads, batch=batch, length=length, config=asdict(cfg), error=error))
                    continue
                gbps = nbytes / (ms * 1e-3) / 1e9
                results.append(dict(heads=heads, batch=batch, length=length, config=asdict(cfg), ms=ms, gbps=gbps,
                                    pct_copy=100 * gbps / copy_gbps, compiled=last_stage1_report()))  # fmt: skip
                print(f"H={heads:3d} {batch:3d}x{length:6d} {asdict(cfg)} {ms * 1e3:8.1f} us {gbps:7.0f} GB/s")
            del p
            torch.cuda.empty_cache()
    return results


def _per_call_us(fn, repeats: int, warmup: int = 20, sync=torch.cuda.synchronize) -> float:
    """Median host µs per call of ``fn`` over ``repeats`` loops of ``HOST_CALLS`` calls (``sync`` between loops)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        times.append((time.perf_counter() - start) / HOST_CALLS * 1e6)
        sync()
    return statistics.median(times)


def _host_row(batch: int, length: int, repeats: int) -> dict:
    import mla_kernels.mla_decode as decode_module

    p = make_problem(batch, length, 16)
    q_lat, q_pe = p["q_latent"].view(batch, 16, D_C), p["q_pe"].reshape(batch, 16, D_R)
    f = fp8_cache(p)
    c_kv, k_pe, lens, device = p["c_kv"], p["k_pe"], p["seq_lens"], q_lat.device
    sms = num_sms(device)
    splits = choose_num_splits(batch, 1, length, sms, default_config(16, batch, sms, length))
    launchers = decode_module._STAGE1, decode_module._STAGE2

    def triton_launches(call):  # the same call through Triton's own kernel[grid](...) launches
        def run():
            enabled = [launcher.compiled_launch for launcher in launchers]
            for launcher in launchers:
                launcher.compiled_launch = False
            try:
                call()
            finally:
                for launcher, state in zip(launchers, enabled, strict=True):
                    launcher.compiled_launch = state

        return run

    def bf16():
        mla_decode(q_lat, q_pe, c_kv, k_pe, lens, SOFTMAX_SCALE)

    def fp8():
        mla_decode(q_lat, q_pe, f["c_kv"], f["k_pe"], lens, SOFTMAX_SCALE, c_kv_scale=f["c_kv_scale"])

    owned = dict(  # caller-owned outputs and split scratch: the call allocates nothing
        out=torch.empty_like(q_lat),
        lse=torch.empty(batch, 16, device=device),
        workspace=decode_workspace(q_lat, q_pe, c_kv, k_pe, lens),
    )

    def bf16_owned():
        mla_decode(q_lat, q_pe, c_kv, k_pe, lens, SOFTMAX_SCALE, **owned)

    scratch = [((batch, 16, D_C), q_lat.dtype), ((batch, 16), torch.float32)]
    if splits > 1:
        scratch.append(((batch * 16 * splits * (D_C + 1),), torch.float32))
    parts = dict(
        mla_decode_us=bf16,
        mla_decode_triton_launch_us=triton_launches(bf16),
        mla_decode_owned_buffers_us=bf16_owned,
        mla_decode_fp8_us=fp8,
        mla_decode_fp8_triton_launch_us=triton_launches(fp8),
        allocations_us=lambda: [torch.empty(shape, device=device, dtype=dtype) for shape, dtype in scratch],
    )
    row = dict(batch=batch, length=length, splits=splits, calls_per_loop=HOST_CALLS)
    row.update({name: _per_call_us(fn, repeats) for name, fn in parts.items()})
    for name in ("mla_decode", "mla_decode_fp8"):
        row[f"{name}_speedup"] = row[f"{name}_triton_launch_us"] / row[f"{name}_us"]
    return row


def host_overhead(args) -> list[dict]:
    """Host microseconds per eager ``mla_decode`` call (issue 17's <= 15 µs goal), launched through the compiled
    kernels (``mla_kernels.triton_launch``, the default) and, side by side, through Triton's own launches.

    The problem is tiny (16 heads, ``HOST_SHAPES``), so the GPU finishes each launch before the host issues the
    next and a loop of calls without a sync measures the host alone: median over ``--repeats`` loops of
    ``HOST_CALLS`` calls. Also timed: the call with caller-owned outputs and scratch (no allocation), and the
    allocations alone."""
    rows = []
    for batch, length in HOST_SHAPES:
        row = _host_row(batch, length, args.repeats)
        rows.append(row)
        print(
            f"{batch}x{length} splits={row['splits']}: mla_decode {row['mla_decode_us']:.1f} us/call vs "
            f"{row['mla_decode_triton_launch_us']:.1f} through Triton's launches ({row['mla_decode_speedup']:.1f}x); "
            f"fp8 cache {row['mla_decode_fp8_us']:.1f} vs {row['mla_decode_fp8_triton_launch_us']:.1f}; "
            f"caller-owned buffers {row['mla_decode_owned_buffers_us']:.1f}; "
            f"allocations alone {row['allocations_us']:.1f}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def host_python(args) -> list[dict]:
    """Host µs per ``mla_decode`` call on CPU tensors, so that any machine runs it. ``python_us``: everything but
    the driver call (the compiled-launch path of ``mla_kernels.triton_launch``, forced on for CPU tensors, with a
    stand-in compiled kernel whose launcher returns at once); ``around_launches_us``: the launches replaced by
    no-ops. Median over ``--repeats`` loops of ``HOST_CALLS`` calls."""
    import mla_kernels.mla_decode as decode_module
    import mla_kernels.triton_launch as launch_module
    from mla_kernels.triton_launch import CompiledLauncher

    class CompiledStandIn:  # the attributes CompiledLauncher reads of a Triton CompiledKernel
        function = 0
        packed_metadata = (4, 1, 0)

        @staticmethod
        def run(*launch_args) -> None:
            return None

    def per_call_us(call) -> float:  # CPU tensors: nothing to wait for between loops
        return _per_call_us(call, args.repeats, warmup=HOST_CALLS, sync=lambda: None)

    launchers = decode_module._STAGE1, decode_module._STAGE2
    device, stream, launch = launch_module.current_device, launch_module.current_stream, CompiledLauncher.__call__
    launch_module.current_device, launch_module.current_stream = (lambda: 0), (lambda device_index: 0)
    for launcher in launchers:
        launcher._launches_compiled = lambda tensor: True
        launcher._compile = lambda *compile_args: CompiledStandIn
    rows = []
    try:
        for batch, length in HOST_SHAPES:
            cache = torch.randn(batch, length, D_C + D_R, dtype=torch.bfloat16)
            c_kv, k_pe = cache[..., :D_C], cache[..., D_C:]
            q_lat = torch.randn(batch, 16, D_C, dtype=torch.bfloat16)
            q_pe = torch.randn(batch, 16, D_R, dtype=torch.bfloat16)
            lens = torch.full((batch,), length, dtype=torch.int32)

            def call(q_lat=q_lat, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe, lens=lens):
                mla_decode(q_lat, q_pe, c_kv, k_pe, lens, SOFTMAX_SCALE)

            owned = dict(
                out=torch.empty_like(q_lat),
                lse=torch.empty(batch, 16),
                workspace=decode_workspace(q_lat, q_pe, c_kv, k_pe, lens),
            )

            def call_owned(q_lat=q_lat, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe, lens=lens, owned=owned):
                mla_decode(q_lat, q_pe, c_kv, k_pe, lens, SOFTMAX_SCALE, **owned)

            row = dict(batch=batch, length=length, python_us=per_call_us(call))
            row["python_owned_buffers_us"] = per_call_us(call_owned)
            CompiledLauncher.__call__ = lambda self, *launch_args: None
            try:
                row["around_launches_us"] = per_call_us(call)
            finally:
                CompiledLauncher.__call__ = launch
            rows.append(row)
            print(
                f"{batch}x{length}: {row['python_us']:.1f} us/call of Python (launches included), "
                f"{row['python_owned_buffers_us']:.1f} with caller-owned buffers, "
                f"{row['around_launches_us']:.1f} around the launches",
                flush=True,
            )
    finally:
        launch_module.current_device, launch_module.current_stream = device, stream
        for launcher in launchers:
            del launcher._launches_compiled, launcher._compile
            launcher._kernels.clear()
    return rows


def print_row(row: dict) -> None:
    def cell(name):
        r = row.get(name)
        return f"{r['ms'] * 1e3:9.1f} {r['gbps']:7.0f} {r['pct_copy']:5.1f}%" if r else f"{'-':>9} {'-':>7} {'-':>6}"

    speed = " ".join(f"{row.get(f'speedup_vs_{b}', float('nan')):7.1f}x" for b in ("naive", "absorbed"))
    print(f"H={row['heads']:3d} {row['batch']:3d}x{row['length']:6d} | naive {cell('naive')} | absorbed "
          f"{cell('absorbed')} | triton {cell('triton')} | {speed} | graph={row['graphed']}", flush=True)  # fmt: skip


def compile_report(args) -> list[dict]:
    """Per shape, the compiler's view of the stage-1 kernel of each variant on an sm90 GPU with ``args.sms`` SMs:
    ``bf16`` and the fp8 configs of ``--fp8`` at 16 heads; at more heads the bf16 default and the 16- and 64-head
    block configs (64-row blocks are what Hopper's ``wgmma`` takes). Empty tensors on the CPU: nothing is run."""
    rows = []
    for heads in args.heads:
        for batch, length in args.shapes:
            q_lat = torch.empty(batch, heads, D_C, dtype=torch.bfloat16)
            q_pe = torch.empty(batch, heads, D_R, dtype=torch.bfloat16)
            lens = torch.full((batch,), length, dtype=torch.int32)
            cache = torch.empty(batch, length, D_C + D_R, dtype=torch.bfloat16)  # never touched
            bf16 = dict(c_kv=cache[..., :D_C], k_pe=cache[..., D_C:], c_kv_scale=None)
            fp8 = _fp8_layout(
                torch.empty(batch, length, D_C + 4 * (D_C // FP8_GROUP_SIZE) + 2 * D_R, dtype=torch.uint8)
            )
            variants = {"bf16": (bf16, None)}
            if heads <= 16:
                base = default_config(heads, batch, args.sms, length, fp8=True)
                variants.update({"fp8": (fp8, None), **{n: (fp8, c) for n, c in fp8_variants(base).items()}})
            else:
                for block_h, block_n, warps in ((16, 64, 4), (64, 32, 8), (64, 16, 8)):
                    config = DecodeConfig(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=2)
                    variants[f"bf16_block_h{block_h}_n{block_n}_w{warps}"] = (bf16, config)
            for name, (layout, config) in variants.items():
                report = stage1_compile_report(
                    q_lat, q_pe, layout["c_kv"], layout["k_pe"], lens, c_kv_scale=layout["c_kv_scale"], config=config,
                    sms=args.sms,
                )  # fmt: skip
                rows.append(dict(heads=heads, batch=batch, length=length, variant=name, **report))
                spill = report["stack_bytes"] + report["local_bytes"]
                print(f"H={heads:3d} {batch:3d}x{length:6d} {name:24s} regs {report['registers']:3d} spill {spill} B "
                      f"smem {report['shared_bytes'] // 1024:3d} KiB pipelined {report['async_copies']} "
                      f"wgmma {report['wgmma']} mma.sync {report['mma_sync']}", flush=True)  # fmt: skip
            del cache, fp8
    return rows


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="+", help="default: 16 128 (--fp8: 16)")
    parser.add_argument("--methods", nargs="+", default=["naive", "absorbed", "triton"])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per op (naive: a fifth)")
    parser.add_argument("--graph-max-tokens", type=int, default=1 << 30, help="CUDA-graph shapes up to B*L tokens")
    parser.add_argument("--shapes", type=_shape, nargs="+", help="BxL, e.g. 1x131072 (default: see above)")
    parser.add_argument("--sweep", action="store_true", help="time the stage-1 launch configs instead")
    parser.add_argument("--extended", action="store_true", help="with --sweep: the second-round configs")
    parser.add_argument("--fp8", action="store_true", help="Triton over the bf16 vs the fp8 latent cache")
    parser.add_argument("--fp8-sweep", action="store_true", help="with --fp8: also the FP8_SWEEP_CONFIGS")
    parser.add_argument("--host-overhead", action="store_true", help="host µs per eager call, both launches")
    parser.add_argument("--host-python", action="store_true", help="the Python of an mla_decode call (CPU)")
    parser.add_argument("--compile-report", action="store_true", help="the compiler's view for an sm90 GPU (CPU)")
    parser.add_argument("--sms", type=int, default=132, help="with --compile-report: the GPU's SMs (H100/H200: 132)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.heads = args.heads or ([16] if args.fp8 or args.compile_report else [16, 128])
    args.shapes = args.shapes or (FP8_SHAPES if args.fp8 or args.compile_report else SHAPES)
    if args.compile_report:
        import triton

        result = dict(torch=torch.__version__, triton=triton.__version__, target=f"sm90, {args.sms} SMs")
        result["compile_report"] = compile_report(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if args.host_python:
        result = dict(torch=torch.__version__, host_python=host_python(args), args=vars(args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if not torch.cuda.is_available():
        print("benchmark_mla needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer(args.repeats)
    copy_gbps = copy_bandwidth_gbps(timer)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; copy bandwidth {copy_gbps:.0f} GB/s (read + write); torch {torch.__version__}")
    print("columns per method: us, GB/s, % of copy; speedups of triton vs naive and vs absorbed")
    result = dict(device=device, copy_gbps=copy_gbps, torch=torch.__version__, args=vars(args))
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if args.host_overhead:
        result["host_overhead"] = host_overhead(args)
    elif args.fp8:
        print("per cache: us, GB/s (each counted with its own bytes: 1,152 vs 656 per token); speedup = bf16/fp8")
        result["fp8"] = run_fp8(args, timer, copy_gbps)
    elif args.sweep:
        result["sweep"] = run_sweep(args, timer, copy_gbps)
    else:
        result["rows"] = run_table(args, timer, copy_gbps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
