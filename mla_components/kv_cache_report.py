"""KV-cache size of any Torchtune decoder, measured from the cache tensors it allocates (the passkey evaluation and
the main job report it; ``python benchmarks/kv_cache_report.py`` prints :func:`kv_cache_table`).

Models are built on the meta device (no weights allocated); only the caches are real tensors. Bytes per token are
read off caches allocated at two lengths (and checked to grow linearly) before being scaled to 128k and 1M tokens.
The ``mla_1b_fp8`` row is ``mla_1b(kv_cache_dtype="fp8_e4m3")``: FlashMLA's 656-byte rows (e4m3 latent, fp32 group
scales, bf16 rope key), whatever the cache dtype says.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchtune.modules import KVCache, TransformerDecoder

from mla_components.modules.kv_cache import MLAKVCache


def allocated_kv_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the KV-cache tensors of ``model`` (Torchtune ``KVCache`` or ``MLAKVCache``, whose one buffer
    holds the fp8 latent, its scales and the rope key when quantised), excluding the position bookkeeping."""
    total = 0
    for module in model.modules():
        if isinstance(module, MLAKVCache):
            total += module.cache.nbytes
        elif isinstance(module, KVCache):
            total += module.k_cache.nbytes + module.v_cache.nbytes
    return total


def kv_cache_bytes_per_token(
    builder: Callable[..., TransformerDecoder], dtype: torch.dtype = torch.bfloat16, probe_len: int = 512
) -> int:
    """Cache bytes per token (batch 1) of the model ``builder()`` makes, from real allocations at two lengths.
    ``dtype`` is the ``setup_caches`` dtype: an fp8 MLA cache stores 656-byte rows whatever it is."""
    with torch.device("meta"):
        model = builder()
    sizes = []
    for length in (probe_len, 2 * probe_len):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=length)
        sizes.append(allocated_kv_cache_bytes(model))
        for module in model.modules():  # drop the caches before the next allocation
            if hasattr(module, "kv_cache"):
                module.kv_cache, module.cache_enabled = None, False
    per_token, remainder = divmod(sizes[1] - sizes[0], probe_len)
    if remainder or sizes[0] != per_token * probe_len:
        name = getattr(builder, "__name__", repr(builder))
        raise RuntimeError(f"{name}: cache size does not grow linearly with length ({sizes})")
    return per_token


@dataclass
class CacheRow:
    name: str
    bytes_per_token: int

    def at(self, tokens: int) -> int:
        return self.bytes_per_token * tokens


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    raise AssertionError


def format_table(rows: list[CacheRow], reference: str) -> str:
    """A plain-text table: bytes/token, per 1k tokens, at 128k and 1M tokens, and the ratio to ``reference``."""
    ref = next(r for r in rows if r.name == reference).bytes_per_token
    header = (
        f"{'model':<10} {'bytes/token':>12} {'per 1k tokens':>14} {'at 128k':>12} {'at 1M':>12} {'vs ' + reference:>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<10} {r.bytes_per_token:>12,} {_human(r.at(1000)):>14} {_human(r.at(131_072)):>12} "
            f"{_human(r.at(1_048_576)):>12} {r.bytes_per_token / ref:>9.2f}x"
        )
    return "\n".join(lines)


def mla_1b_fp8(**overrides) -> TransformerDecoder:
    """``mla_1b`` with the fp8 latent cache (``kv_cache_dtype="fp8_e4m3"``)."""
    from mla_components.models import mla_1b

    return mla_1b(**{"kv_cache_dtype": "fp8_e4m3", **overrides})


def kv_cache_table(dtype: str = "bfloat16") -> str:
    """Print and return the table of mla_1b (bf16 and fp8 cache) vs gqa_1b vs mha_1b, caches in ``dtype``."""
    from mla_components.models import gqa_1b, mha_1b, mla_1b

    rows = [
        CacheRow(name, kv_cache_bytes_per_token(builder, getattr(torch, dtype)))
        for name, builder in (("mla_1b", mla_1b), ("mla_1b_fp8", mla_1b_fp8), ("gqa_1b", gqa_1b), ("mha_1b", mha_1b))
    ]
    table = format_table(rows, reference="mla_1b")
    print(f"KV cache per sequence ({dtype}), measured from allocated cache tensors:\n{table}")
    return table
