"""The 512 + 64 conversion of SmolLM2-135M-Instruct is servable and numerically our model: transformers'
DeepseekV3 computes our logits on the conversion's directory, real vLLM (CPU build) greedy-decodes our tokens from
its fp32 export, and vLLM's OpenAI server answers a chat question with the origin's chat template and our answer.

The conversion itself runs once per session (``converted_512_run`` in conftest.py, through ``tune run``).
"""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from torchtune.data import Message

from mla_components.checkpointing import load_hf_checkpoint
from mla_components.data import hf_tokenizer
from mla_components.decoding import greedy_generate
from mla_components.export import export_checkpoint, load_exported_checkpoint
from mla_components.models import mla_from_checkpoint
from tests.serving.conftest import (
    SERVING,
    VLLM_CPU_ARGS,
    VLLM_ENV,
    free_port,
    http_json,
    stop,
    vllm_python,
    wait_until_up,
)
from tests.serving.test_vllm_parity import greedy_with_margins

pytestmark = pytest.mark.slow  # a conversion, then two vLLM engines: minutes on 2 cores
MAX_NEW_TOKENS = 24
REL_TOL = 1e-4  # the origin parity tests' bound; measured about 1e-5 to 4e-5 (fp32 rounding through 30 layers)
QUESTION = "What is the capital of France?"
TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "There is an important info hidden inside a lot of irrelevant text. The pass key is 71432. Remember it. "
    "The grass is green. The sky is blue. What is the pass key? The pass key is",
)
SERVED_NAME = "smollm2-135m-mla-512"


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (as the origin parity tests measure it)."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def tokenizer(converted_512_dir):
    return hf_tokenizer(str(converted_512_dir))


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    """The origin's chat template around ``QUESTION``, open for the assistant's answer."""
    tokens, _ = tokenizer.tokenize_messages([Message("user", QUESTION)], add_end_tokens=False)
    return tokens


@pytest.fixture(scope="module")
def prompts(tokenizer, chat_prompt) -> list[list[int]]:
    return [tokenizer.encode(text, add_bos=False, add_eos=False) for text in TEXTS] + [chat_prompt]


def ours_from(config_dir, state) -> torch.nn.Module:
    model = mla_from_checkpoint(str(config_dir), kernel_backend="torch")
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def fp32_export(converted_512_dir, tmp_path_factory):
    """``python -m mla_components.export --checkpoint <conversion> --output <dir> --dtype float32``: what vLLM
    serves (the export writes ``lm_head.weight``, which vLLM's DeepseekV3 needs for tied embeddings)."""
    out = tmp_path_factory.mktemp("converted-export") / "export"
    return export_checkpoint(converted_512_dir, out, dtype="float32")


@pytest.fixture(scope="module")
def our_export_model(fp32_export):
    _, state = load_exported_checkpoint(fp32_export)
    return ours_from(fp32_export, state)


@torch.no_grad()
def test_transformers_deepseek_v3_computes_our_logits(converted_512_dir, prompts):
    from transformers import DeepseekV3ForCausalLM

    hf, info = DeepseekV3ForCausalLM.from_pretrained(
        converted_512_dir, dtype=torch.float32, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    _, state = load_hf_checkpoint(converted_512_dir)
    model = ours_from(converted_512_dir, state)
    errors = []
    for prompt in prompts[::3]:  # a plain-text and the chat prompt
        ids = torch.tensor([prompt])
        ours, theirs = model(ids), hf.eval()(ids).logits
        assert ours.shape == theirs.shape == (1, len(prompt), 49152)
        errors.append(rel_error(ours, theirs))
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    print(f"transformers DeepseekV3 vs ours: relative logit errors {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= REL_TOL, errors


def test_export_holds_the_conversions_weights(converted_512_dir, fp32_export):
    converted = load_file(converted_512_dir / "model.safetensors")
    exported = load_file(fp32_export / "model.safetensors")
    # the tied output layer is written out: vLLM's DeepseekV3 would otherwise serve an uninitialised lm_head
    assert "lm_head.weight" not in converted and set(exported) == set(converted) | {"lm_head.weight"}
    assert torch.equal(exported["lm_head.weight"], converted["model.embed_tokens.weight"])
    assert all(torch.equal(exported[k], v) for k, v in converted.items())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (fp32_export / name).read_bytes() == (converted_512_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def vllm_greedy(fp32_export, prompts, tmp_path_factory):
    """vLLM's offline ``LLM`` (tests/serving/vllm_offline.py, the vLLM virtualenv) on the fp32 export."""
    python = vllm_python()
    work = tmp_path_factory.mktemp("converted-vllm")
    request, result = work / "request.json", work / "result.json"
    run = {"model": str(fp32_export), "dtype": "float32"}
    request.write_text(json.dumps({"runs": [run], "prompts": prompts, "max_tokens": MAX_NEW_TOKENS}))
    proc = subprocess.run(
        [python, str(SERVING / "vllm_offline.py"), str(request), str(result)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **VLLM_ENV},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(result.read_text())[0]


def test_vllm_greedy_equals_ours_fp32(vllm_greedy, our_export_model, prompts, tokenizer):
    tokens, logprobs, margin = greedy_with_margins(our_export_model, prompts)
    for prompt, ours, theirs in zip(prompts, tokens, vllm_greedy["token_ids"], strict=True):
        print(f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(ours)!r}")
        assert theirs == ours, (tokenizer.decode(theirs), tokenizer.decode(ours))
    diff = max(
        abs(a - b)
        for ours, theirs in zip(logprobs, vllm_greedy["logprobs"], strict=True)
        for a, b in zip(ours, theirs, strict=True)
    )
    print(f"vLLM vs ours: {len(prompts)} x {MAX_NEW_TOKENS} tokens equal; max |logprob difference| {diff:.2e}, "
          f"smallest argmax margin {margin:.2e}")  # fmt: skip
    assert diff < 1e-3, f"vLLM and our log-probabilities differ by {diff}"
    # equal tokens prove equal models only where no step was a near-tie (an argmax flips only below 2 * diff)
    assert margin > 2 * diff, f"smallest argmax margin {margin} vs numerical difference {diff}"


@pytest.fixture(scope="module")
def vllm_server(fp32_export, tmp_path_factory, vllm_greedy):
    """``vllm serve`` (the OpenAI API server) on the fp32 export; started after the offline engine has exited
    (``vllm_greedy``), as 2 cores hold one engine at a time. Yields the base URL."""
    python = vllm_python()
    log = tmp_path_factory.mktemp("converted-server") / "vllm-server.log"
    port = free_port()
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fp32_export),
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--max-num-seqs", "4", "--enforce-eager", "--seed", "0", *VLLM_CPU_ARGS,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV}, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, log, timeout=420)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@torch.no_grad()
def test_chat_endpoint_answers_with_our_greedy_answer(vllm_server, our_export_model, tokenizer, chat_prompt):
    messages = [{"role": "user", "content": QUESTION}]
    rendered = http_json(
        f"{vllm_server}/tokenize", {"model": SERVED_NAME, "messages": messages, "add_generation_prompt": True}
    )
    assert rendered["tokens"] == chat_prompt  # vLLM renders the origin's chat template as our tokenizer does
    reply = http_json(
        f"{vllm_server}/v1/chat/completions",
        {"model": SERVED_NAME, "messages": messages, "max_tokens": 48, "temperature": 0, "seed": 0},
        timeout=300,
    )
    choice = reply["choices"][0]
    answer = choice["message"]["content"]
    print(f"chat endpoint: {QUESTION!r} -> {answer!r} (finish_reason {choice['finish_reason']})")
    assert reply["model"] == SERVED_NAME and choice["message"]["role"] == "assistant"
    assert isinstance(answer, str) and answer and reply["usage"]["completion_tokens"] > 0
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["prompt_tokens"] == len(chat_prompt)
    # the answer is our model's greedy answer to the same prompt, up to the end-of-turn token
    out, _ = greedy_generate(our_export_model, torch.tensor(chat_prompt), 48, stop_tokens=tokenizer.stop_tokens)
    new = out[0, len(chat_prompt) :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in tokenizer.stop_tokens), len(new))]
    assert answer == tokenizer.decode(new)
