"""Passkey retrieval through real vLLM: the passkey recipe's prompts, greedy decoding by vLLM's offline engine, the
recipe's scoring. For an export (``python -m mla_components.export``, ``--pad-latent 512`` for a 256 + 64 model).

Three steps, because vLLM lives in its own virtualenv (``make serve-setup``) without this package:

    python benchmarks/vllm_passkey.py prompts --tokenizer EXPORT --lengths 2048 4096 --trials 2 --output prompts.json
    .venv-vllm/bin/python benchmarks/vllm_passkey.py generate --model EXPORT --prompts prompts.json --output gen.json
    python benchmarks/vllm_passkey.py score --prompts prompts.json --generated gen.json --tokenizer EXPORT

The prompts are those of ``mla_recipes/passkey_eval.py`` for the same grid and seed (``make_trials``), so a score
here sits beside the recipe's on the same model: the same prompts, decoded by another engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def write_prompts(args: argparse.Namespace) -> None:
    from mla_components.data import hf_tokenizer
    from mla_components.evaluation.passkey import PasskeyGrid, make_trials

    grid = PasskeyGrid(
        context_lengths=tuple(args.lengths),
        depths=tuple(args.depths),
        trials_per_cell=args.trials,
        prompt_format=args.prompt_format,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    trials = make_trials(hf_tokenizer(str(args.tokenizer)), grid)
    records = [{**t.record(), "prompt_ids": list(t.prompt)} for t in trials]
    args.output.write_text(json.dumps({"max_new_tokens": grid.max_new_tokens, "trials": records}))
    print(f"wrote {len(records)} prompts to {args.output}")


def generate(args: argparse.Namespace) -> None:
    # the CPU build reserves --gpu-memory-utilization of the host's RAM unless given a KV-cache size (GiB)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_cache_gib))
    from vllm import LLM, SamplingParams

    request = json.loads(args.prompts.read_text())
    prompts = [t["prompt_ids"] for t in request["trials"]]
    llm = LLM(
        model=str(args.model),
        dtype=args.dtype,
        max_model_len=max(map(len, prompts)) + request["max_new_tokens"],
        max_num_seqs=args.max_num_seqs,
        enforce_eager=True,
        attention_backend=args.attention_backend,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = [list(out.outputs[0].token_ids) for out in outputs]
    args.output.write_text(json.dumps({"model": str(args.model), "seconds": seconds, "token_ids": generated}))
    print(f"wrote {len(generated)} generations to {args.output} ({seconds:.1f} s)")


def score(args: argparse.Namespace) -> None:
    from mla_components.data import hf_tokenizer
    from mla_components.evaluation.passkey import decode_generated
    from mla_components.evaluation.scoring import extract_value, is_correct

    trials = json.loads(args.prompts.read_text())["trials"]
    generated = json.loads(args.generated.read_text())
    if len(generated["token_ids"]) != len(trials):
        sys.exit(f"{args.generated} holds {len(generated['token_ids'])} generations for {len(trials)} prompts")
    tokenizer = hf_tokenizer(str(args.tokenizer))
    rows: dict[int, list[bool]] = {}
    for trial, ids in zip(trials, generated["token_ids"], strict=True):
        text = decode_generated(tokenizer, ids)
        ok = is_correct(text, trial["answer"])
        rows.setdefault(trial["context_tokens"], []).append(ok)
        value = extract_value(text)
        print(f"{trial['context_tokens']:>7} depth {trial['depth']:.2f}: {trial['answer']} -> {value} {text!r}")
    for length, oks in sorted(rows.items()):
        print(f"{generated['model']} @ {length:,} tokens: {sum(oks)}/{len(oks)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prompts", help="the passkey recipe's prompts as token ids (this package's venv)")
    p.add_argument("--tokenizer", type=Path, required=True, help="an HF directory with the tokenizer (the export)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--prompt-format", default="landmark", choices=("landmark", "chat"))
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    g = commands.add_parser("generate", help="greedy generations by vLLM's offline engine (the vLLM venv)")
    g.add_argument("--model", type=Path, required=True, help="an export directory")
    g.add_argument("--prompts", type=Path, required=True)
    g.add_argument("--output", type=Path, required=True)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-num-seqs", type=int, default=2)
    g.add_argument("--cpu-kv-cache-gib", type=int, default=2, help="the CPU build's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    g.add_argument("--attention-backend", default="CPU_MLA", help="vLLM's MLA backend (CPU_MLA on a CPU build)")
    s = commands.add_parser("score", help="the recipe's scoring of vLLM's generations (this package's venv)")
    s.add_argument("--prompts", type=Path, required=True)
    s.add_argument("--generated", type=Path, required=True)
    s.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args(argv)
    {"prompts": write_prompts, "generate": generate, "score": score}[args.command](args)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
