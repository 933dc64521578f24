"""KV cache per sequence of mla_1b (bf16 and fp8 cache) vs gqa_1b vs mha_1b, measured from allocated cache tensors
(the table of the README; models on the meta device, so it runs anywhere in seconds).

    python benchmarks/kv_cache_report.py [--dtype bfloat16]
"""

import argparse

from mla_components.kv_cache_report import kv_cache_table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return kv_cache_table(parser.parse_args(argv).dtype)


if __name__ == "__main__":
    main()
