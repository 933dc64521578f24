"""Load an export with transformers' ``AutoModelForCausalLM`` and write its loading report and logits as JSON.

Run by the vLLM virtualenv's python for torchao-quantised exports: transformers reads torchao checkpoints only
with torchao >= 0.15, which the training environment can't have (torchtune 0.6.1 needs < 0.15).

    .venv-vllm/bin/python tests/serving/hf_load.py EXPORT_DIR prompts.json result.json
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    directory, prompts_path, result_path = sys.argv[1:]
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    weight = model.model.layers[0].self_attn.kv_b_proj.weight
    result = {
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "weight_type": type(weight).__name__,
        "logits": [],
    }
    with torch.no_grad():
        for prompt in json.loads(Path(prompts_path).read_text()):
            result["logits"].append(model(torch.tensor([prompt])).logits[0].tolist())
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
