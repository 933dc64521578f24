"""Bounded load test of an OpenAI-compatible server: N completion requests, C at a time; JSON report on stdout.

    .venv-vllm/bin/python tests/serving/load_test.py --url http://127.0.0.1:8000 --model infinitecontext-1b \
        --requests 200 --concurrency 16 --max-tokens 16
"""

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


async def one_request(session, url, payload, latencies, errors):
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as response:
            body = await response.json()
            if response.status != 200 or body["usage"]["completion_tokens"] != payload["max_tokens"]:
                errors.append(f"{response.status}: {str(body)[:200]}")
                return
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError) as e:
        errors.append(repr(e))
        return
    latencies.append(time.perf_counter() - start)


async def run(args) -> dict:
    latencies, errors = [], []
    semaphore = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    async def bounded(i, session):
        payload = {
            "model": args.model,
            "prompt": f"Request {i}: the passkey is",
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        async with semaphore:
            await one_request(session, args.url, payload, latencies, errors)

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(bounded(i, session) for i in range(args.requests)))
    wall = time.perf_counter() - start
    report = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall}  # fmt: skip
    if latencies:
        report.update(
            p50_s=percentile(latencies, 50),
            p90_s=percentile(latencies, 90),
            p99_s=percentile(latencies, 99),
            mean_s=statistics.fmean(latencies),
            requests_per_s=len(latencies) / wall,
            output_tokens_per_s=len(latencies) * args.max_tokens / wall,
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
