"""The Prometheus-style judge: output parsing, prompts, and a real OpenAI-compatible server (vLLM, CPU)."""

import csv
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mla_components.evaluation.judge import (
    ABSOLUTE_PROMPT,
    LONG_CONTEXT_RUBRIC,
    OpenAICompatibleJudge,
    build_judge,
    build_messages,
    parse_absolute_output,
)
from mla_components.evaluation.passkey import run
from tests.eval.conftest import REPO
from tests.eval.test_scoring import AnsweringStub


@pytest.mark.parametrize(
    ("text", "score", "status"),
    [
        ("The response gives the needle exactly. [RESULT] 5", 5, "ok"),
        ("Wrong value, a decoy. [RESULT] (2)", 2, "ok"),
        ("Feedback. [RESULT]: 3\n", 3, "ok"),
        ('Format "[RESULT] (an integer)". It is hallucinated. [RESULT] 1', 1, "ok"),  # the last marker counts
        ("Score: 4", None, "no_result_marker"),  # Prometheus' format only
        ("Feedback. [RESULT] 7", None, "score_out_of_range"),
        ("Feedback. [RESULT] 0", None, "score_out_of_range"),
        ("   ", None, "empty"),
        (None, None, "empty"),
        ("\ufffd\ufffd garbage 4 [RES", None, "no_result_marker"),
    ],
)
def test_parse_absolute_output(text, score, status):
    verdict = parse_absolute_output(text)
    assert (verdict.score, verdict.status) == (score, status)
    if status == "ok":
        assert verdict.feedback == text[: text.rindex("[RESULT]")].strip()


TRIAL = {
    "model": "m",
    "context_tokens": 4096,
    "depth": 0.25,
    "trial": 0,
    "answer": "71432",
    "correct": False,
    "question": "What is the pass key?",
    "needle_excerpt": "... The pass key is 71432. Remember it. ...",
    "distractors": [],
    "decoys": ["55555"],
    "generated": "55555",
}


def test_prompt_is_prometheus_absolute_format_with_the_rubric():
    (merged,) = build_messages(TRIAL, "merge")
    system, user = build_messages(TRIAL, "separate")
    assert system["role"] == "system" and merged["content"].endswith(user["content"])
    prompt = user["content"]
    assert prompt.startswith(ABSOLUTE_PROMPT.split("{instruction}")[0]) and prompt.endswith("###Feedback: ")
    assert LONG_CONTEXT_RUBRIC in prompt and "Score 1: The response states a value that appears nowhere" in prompt
    assert "###Reference Answer (Score 5):\n71432" in prompt and "###Response to evaluate:\n55555" in prompt
    assert "The pass key is 71432" in prompt and "(not the answer): 55555" in prompt and "25%" in prompt
    with pytest.raises(ValueError, match="judge.system_prompt"):
        build_messages(TRIAL, "user")


def test_bad_judge_config_and_unreachable_server_fail_fast():
    with pytest.raises(ValueError, match=r"missing \['base_url'\]"):
        build_judge({"model": "x"})
    with pytest.raises(ValueError, match="judge.base_url must start with http"):
        build_judge({"base_url": "localhost:8000", "model": "x"})
    judge = OpenAICompatibleJudge("http://127.0.0.1:9/v1", "x", timeout_s=5)  # port 9 (discard): nothing listens
    with pytest.raises(ConnectionError, match=r"judge.base_url http://127.0.0.1:9/v1"):
        judge.check_endpoint()


def test_unreachable_judge_fails_before_any_model_loads(passkey_cfg):
    passkey_cfg.judge = {"base_url": "http://127.0.0.1:9/v1", "model": "x", "timeout_s": 5}

    def load_model(entry):
        raise AssertionError("a model was loaded before the judge endpoint was checked")

    with pytest.raises(ConnectionError, match="judge.base_url"):
        run(passkey_cfg, load_model=load_model)


# Not chat completions: what a broken proxy or a non-OpenAI server may answer with HTTP 200.
_ODD_BODIES = [b'{"choices": null}', b'{"choices": [{"message": null}]}', b"[1, 2]", b"not json",
               b'{"choices": [{"message": {"content": [{"type": "text"}]}}]}']  # fmt: skip


def test_odd_server_answers_are_request_errors_not_crashes():
    """Fault injection (no real server answers like this): every trial gets a status, none raises."""
    bodies = iter(_ODD_BODIES)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = next(bodies)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = OpenAICompatibleJudge(f"http://127.0.0.1:{server.server_port}/v1", "x", parse_retries=0, timeout_s=5)
        trial = {"model": "m", "context_tokens": 400, "depth": 0.5, "trial": 0, "answer": "12345",
                 "correct": False, "question": "What is the pass key?", "generated": "1", "excerpt": "..."}  # fmt: skip
        judgements = [judge.grade(trial) for _ in _ODD_BODIES]
    finally:
        server.shutdown()
    assert [j["status"] for j in judgements] == ["request_error"] * len(_ODD_BODIES)
    assert all(j["score"] is None and j["raw"] for j in judgements)


@pytest.fixture
def stub_results(passkey_cfg):
    """A passkey run of 2 trials (one right, one wrong answer) written by the real report code."""
    from mla_components.data import byte_tokenizer
    from mla_components.evaluation.passkey import PasskeyGrid, make_trials

    passkey_cfg.context_lengths, passkey_cfg.depths, passkey_cfg.trials_per_cell = [400], [0.5], 2
    tokenizer = byte_tokenizer()
    trials = make_trials(tokenizer, PasskeyGrid.from_config(passkey_cfg))
    plan = {tuple(trials[0].prompt): trials[0].sample.answer, tuple(trials[1].prompt): "12345"}
    return passkey_cfg, AnsweringStub(plan, tokenizer)


@pytest.mark.slow
def test_judge_end_to_end_against_vllm(stub_results, vllm_base_url):
    cfg, stub = stub_results
    # 1) inside the passkey recipe: the judge block grades right after the report
    cfg.judge = {"base_url": vllm_base_url, "model": "tiny-judge", "max_tokens": 16, "parse_retries": 0}
    run(cfg, load_model=lambda entry: stub)
    out = Path(cfg.output_dir)
    answers = [t["answer"] for t in json.loads((out / "results.json").read_text())["models"][0]["trials"]]
    judged = json.loads((out / "judge.json").read_text())
    summary = judged["summary"]
    assert summary["judged"] == 2 and summary["valid"] + summary["malformed"] == 2
    assert sum(summary["statuses"].values()) == 2
    for j in judged["judgements"]:  # the tiny model's junk is recorded as such, with what it said
        assert j["status"] in {"ok", "no_result_marker", "score_out_of_range", "empty"}
        assert (j["score"] is None) == (j["status"] != "ok") and j["attempts"] == 1
    assert judged["judge"]["model"] == "tiny-judge"

    # 2) standalone over the same results, from the shipped judge config (the recipe's judge-only mode)
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("tune")),
            "run",
            "mla_recipes/passkey_eval.py",
            "--config",
            str(REPO / "configs/mla_tiny/judge.yaml"),
            f"results_dir={out}",
            f"judge.base_url={vllm_base_url}",
            "judge.model=tiny-judge",
            "judge.max_tokens=16",
            "judge.parse_retries=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "judge.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["answer"] for r in rows] == answers
    assert all(r["attempts"] in {"1", "2"} for r in rows)
    malformed = [r for r in rows if r["status"] != "ok"]
    assert all(r["attempts"] == "2" and r["score"] == "" for r in malformed)  # re-asked once, then counted
    assert (out / "judge_summary.txt").read_text().startswith("judge tiny-judge @ ")
