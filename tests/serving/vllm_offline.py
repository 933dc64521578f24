"""Greedy decoding with vLLM's offline ``LLM`` API; run by the vLLM virtualenv's python (tests/serving).

    .venv-vllm/bin/python tests/serving/vllm_offline.py request.json result.json

request.json: {"runs": [{"model": DIR, "dtype": "float32", "quantization": null, "kv_cache_dtype": "auto"}],
"prompts": [[ids], ...],
"max_tokens": N}. result.json: one entry per run: {"token_ids": [[...], ...], "logprobs": [[...], ...]} holding, for
each prompt, the generated ids and the log-probability vLLM gave each of them.
"""

import gc
import json
import sys
from pathlib import Path


def generate(run: dict, prompts: list[list[int]], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=run["model"],
        dtype=run["dtype"],
        quantization=run.get("quantization"),
        kv_cache_dtype=run.get("kv_cache_dtype", "auto"),
        max_model_len=1024,
        max_num_seqs=len(prompts),
        enforce_eager=True,  # no graph compilation: seconds instead of minutes on a small CPU
        attention_backend="CPU_MLA",  # not AMX_MLA, which takes bf16 weights only (tests/serving/conftest.py)
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = {"token_ids": [], "logprobs": []}
    for out in outputs:
        completion = out.outputs[0]
        result["token_ids"].append(list(completion.token_ids))
        result["logprobs"].append(
            [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]
        )
    del llm
    gc.collect()
    return result


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    results = [generate(run, request["prompts"], request["max_tokens"]) for run in request["runs"]]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
