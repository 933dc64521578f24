"""LLM-as-a-judge for long-context answers, in Prometheus-Eval's absolute-grading format, over any OpenAI-compatible
endpoint (a ``vllm serve`` of ``prometheus-eval/prometheus-7b-v2.0`` in production).

    tune run mla_recipes/passkey_eval.py --config configs/mla_tiny/judge.yaml results_dir=outputs/mla_tiny/passkey_eval
    python -m mla_components.evaluation.judge --config configs/mla_tiny/judge.yaml results_dir=...

Each passkey trial of a ``results.json`` becomes one judge request: Prometheus' ``ABSOLUTE_PROMPT`` with the question
and the haystack excerpt around the needle as the instruction, the model's answer as the response, the needle value
as the score-5 reference, and a 1-5 rubric for faithfulness to the haystack (no hallucinated needle). The judge must
answer ``<feedback> [RESULT] <1-5>``; anything else is counted as malformed (after ``parse_retries`` re-asks) and
reported, never raised. ``judge.json``, ``judge.csv`` and ``judge_summary.txt`` are written next to the results.

The prompt strings below are Prometheus-Eval's (``prometheus_eval/prompts.py`` v0.1.20, Apache-2.0), kept verbatim
so Prometheus judge models see the format they were trained on. The package itself is not a dependency: see
docs/evaluation.md for why.
"""

from __future__ import annotations

import csv
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# --- Prometheus-Eval v0.1.20 templates (verbatim) -------------------------------------------------------------------
ABS_SYSTEM_PROMPT = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific criteria, "
    "ensuring each assessment reflects the absolute standards set for performance."
)

ABSOLUTE_PROMPT = """###Task Description:
An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a score of 5, and a score rubric representing a evaluation criteria are given.
1. Write a detailed feedback that assess the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.

###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}

###Reference Answer (Score 5):
{reference_answer}

###Score Rubrics:
{rubric}

###Feedback: """  # noqa: E501

SCORE_RUBRIC_TEMPLATE = """
[{criteria}]
Score 1: {score1_description}
Score 2: {score2_description}
Score 3: {score3_description}
Score 4: {score4_description}
Score 5: {score5_description}
""".strip()
# ---------------------------------------------------------------------------------------------------------------------

LONG_CONTEXT_RUBRIC = SCORE_RUBRIC_TEMPLATE.format(
    criteria=(
        "Does the response retrieve exactly the value hidden in the long context (the needle), staying faithful to "
        "the context and never stating a value the context does not contain?"
    ),
    score1_description=(
        "The response states a value that appears nowhere in the context (a hallucinated needle), or gives no "
        "value at all."
    ),
    score2_description=(
        "The response states a value that does appear in the context but is not the asked-for needle (a distractor "
        "or filler), or a corrupted copy of the needle (digits or characters changed, missing or added)."
    ),
    score3_description=(
        "The response contains the correct value but also other candidate values or contradicting statements, so "
        "the answer is ambiguous."
    ),
    score4_description=(
        "The response gives the correct value unambiguously but adds claims that the context does not support."
    ),
    score5_description=(
        "The response gives exactly the needle's value, as the reference answer does, with nothing invented."
    ),
)

# "[RESULT] 4", "[RESULT] (4)", "[RESULT]: 4" -- the last marker in the completion wins (feedback may quote the format).
_RESULT = re.compile(r"\[RESULT\]\s*:?\s*[\(\[]?\s*(-?\d+)\s*[\)\]]?", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeVerdict:
    """One parsed judge completion.

    Attributes:
        score: 1-5, or None when malformed.
        feedback: the text before the ``[RESULT]`` marker (empty when malformed).
        status: ``"ok"``, ``"no_result_marker"``, ``"score_out_of_range"``, ``"empty"`` or ``"request_error"``.
    """

    score: int | None
    feedback: str
    status: str

    @property
    def valid(self) -> bool:
        return self.status == "ok"


def parse_absolute_output(text: str | None) -> JudgeVerdict:
    """Parse ``(feedback) [RESULT] (1-5)``; never raises: malformed text gets a status instead of a score."""
    if not text or not text.strip():
        return JudgeVerdict(None, "", "empty")
    matches = list(_RESULT.finditer(text))
    if not matches:
        return JudgeVerdict(None, "", "no_result_marker")
    last = matches[-1]
    score = int(last.group(1))
    if not 1 <= score <= 5:
        return JudgeVerdict(None, "", "score_out_of_range")
    return JudgeVerdict(score, text[: last.start()].strip(), "ok")


def needle_excerpt(context: str, answer: str, chars: int = 400) -> str:
    """About ``chars`` characters of ``context`` centred on the first occurrence of the needle value (the whole
    context when it is short), with ``...`` where it was cut."""
    if len(context) <= chars:
        return context
    at = context.find(answer)
    centre = len(context) // 2 if at < 0 else at + len(answer) // 2
    start = max(0, min(centre - chars // 2, len(context) - chars))
    end = start + chars
    return ("..." if start else "") + context[start:end] + ("..." if end < len(context) else "")


def build_instruction(trial: dict[str, Any]) -> str:
    """The judge's view of a trial: the question, the haystack excerpt around the needle and the other values the
    context holds (long haystacks do not fit a judge's context; the rubric only needs these)."""
    lines = [
        f"A model read a context of about {trial['context_tokens']:,} tokens with one important value hidden at "
        f"{float(trial['depth']):.0%} of its length, then was asked:",
        str(trial.get("question", "")).strip(),
        "",
        "Excerpt of the context around the hidden value (the rest is repetitive filler):",
        str(trial.get("needle_excerpt", "")).strip(),
    ]
    distractors = [*(trial.get("distractors") or []), *(trial.get("decoys") or [])]
    if distractors:
        lines += ["", "Other values that also appear in the context (not the answer): " + ", ".join(distractors)]
    return "\n".join(lines)


def build_messages(trial: dict[str, Any], system_prompt: str = "merge") -> list[dict[str, str]]:
    """Chat messages for one trial.

    ``system_prompt``: ``"merge"`` puts Prometheus' system prompt at the top of the user turn (Mistral-based judges'
    chat templates reject a system role on vLLM servers), ``"separate"`` sends it as a system message, ``"none"``
    leaves it out.
    """
    user = ABSOLUTE_PROMPT.format(
        instruction=build_instruction(trial),
        response=str(trial.get("generated", "")),
        reference_answer=str(trial["answer"]),
        rubric=LONG_CONTEXT_RUBRIC,
    )
    if system_prompt == "merge":
        return [{"role": "user", "content": f"{ABS_SYSTEM_PROMPT}\n\n{user}"}]
    if system_prompt == "separate":
        return [{"role": "system", "content": ABS_SYSTEM_PROMPT}, {"role": "user", "content": user}]
    if system_prompt == "none":
        return [{"role": "user", "content": user}]
    raise ValueError(f"judge.system_prompt must be 'merge', 'separate' or 'none', got {system_prompt!r}")


class OpenAICompatibleJudge:
    """A judge model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI).

    Args:
        base_url (str): server root including ``/v1``, e.g. ``http://localhost:8000/v1``.
        model (str): model name the server knows (``prometheus-eval/prometheus-7b-v2.0``, a served path, ...).
        api_key_env (str | None): environment variable holding the API key (sent as a Bearer token); None or an
            unset variable sends none (local vLLM needs none).
        temperature, top_p, max_tokens, seed: sampling (Prometheus' defaults: 1.0, 0.9, 1024).
        timeout_s (float): per-request timeout.
        parse_retries (int): re-asks after a malformed completion (Prometheus retries up to 10 times).
        system_prompt (str): see :func:`build_messages`.
        concurrency (int): requests in flight.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        temperature: float = 1.0,
        top_p: float = 0.9,
        max_tokens: int = 1024,
        seed: int | None = 0,
        timeout_s: float = 120.0,
        parse_retries: int = 2,
        system_prompt: str = "merge",
        concurrency: int = 4,
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("judge.model is empty: name the model the server serves")
        if parse_retries < 0 or concurrency < 1 or max_tokens < 1:
            raise ValueError("judge.parse_retries must be >= 0, judge.concurrency and judge.max_tokens >= 1")
        build_messages({"answer": "", "context_tokens": 0, "depth": 0}, system_prompt)  # validates system_prompt
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        if seed is not None:
            self.sampling["seed"] = seed
        self.timeout_s = timeout_s
        self.parse_retries = parse_retries
        self.system_prompt = system_prompt
        self.concurrency = concurrency

    def _request(self, path: str, payload: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    def check_endpoint(self) -> list[str]:
        """``GET /models``; raises a ConnectionError naming ``judge.base_url`` if the server cannot be reached, so a
        wrong URL fails before any trial is sent."""
        try:
            models = [m["id"] for m in self._request("/models").get("data", [])]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConnectionError(f"judge.base_url {self.base_url} is not an OpenAI-compatible server: {e}") from e
        if models and self.model not in models:
            raise ValueError(f"judge.model {self.model!r} is not served at {self.base_url} (it serves {models})")
        return models

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, **self.sampling}
        response = self._request("/chat/completions", body)
        try:
            content = response["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as e:  # any other JSON than a chat completion
            raise ValueError(f"not a chat completion: {str(response)[:200]}") from e
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message content is not text: {str(content)[:200]}")
        return content or ""

    def grade(self, trial: dict[str, Any]) -> dict[str, Any]:
        """Judge one trial; returns the trial's keys, the verdict, the raw completion and the attempts made."""
        messages = build_messages(trial, self.system_prompt)
        verdict, raw, attempts = JudgeVerdict(None, "", "empty"), "", 0
        for attempts in range(1, self.parse_retries + 2):  # noqa: B007 - attempts is reported
            try:
                raw = self.complete(messages)
            except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
                raw, verdict = f"{type(e).__name__}: {e}", JudgeVerdict(None, "", "request_error")
                continue
            verdict = parse_absolute_output(raw)
            if verdict.valid:
                break
        return {
            **{k: trial.get(k) for k in ("model", "context_tokens", "depth", "trial", "answer", "correct")},
            **asdict(verdict),
            "attempts": attempts,
            "raw": raw,
        }

    def grade_all(self, trials: Sequence[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
        from tqdm import tqdm

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(self.grade, trials), total=len(trials), desc="judge", disable=not progress))


def summarize(judgements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, the malformed count (every status but ok), and mean score per model and per length."""
    statuses = Counter(j["status"] for j in judgements)
    by_model: dict[str, dict[str, Any]] = {}
    for model in sorted({j["model"] for j in judgements}):
        scored = [j for j in judgements if j["model"] == model and j["score"] is not None]
        lengths = sorted({j["context_tokens"] for j in judgements if j["model"] == model})
        by_model[model] = {
            "mean_score": sum(j["score"] for j in scored) / len(scored) if scored else None,
            "scored": len(scored),
            "by_length": {
                str(n): (sum(s) / len(s) if (s := [j["score"] for j in scored if j["context_tokens"] == n]) else None)
                for n in lengths
            },
        }
    return {
        "judged": len(judgements),
        "valid": statuses.get("ok", 0),
        "malformed": len(judgements) - statuses.get("ok", 0),
        "statuses": dict(statuses),
        "models": by_model,
    }


def judge_results(results_dir: str | Path, judge: OpenAICompatibleJudge, progress: bool = True) -> dict[str, Any]:
    """Grade every trial of ``results_dir/results.json``; write ``judge.json``, ``judge.csv`` and
    ``judge_summary.txt`` there. Returns the summary."""
    from mla_components.evaluation.report import load_results

    results_dir = Path(results_dir)
    results = load_results(results_dir)
    trials = [{**t, "model": m["name"]} for m in results["models"] for t in m["trials"]]
    judge.check_endpoint()
    judgements = judge.grade_all(trials, progress=progress)
    summary = summarize(judgements)
    meta = {"base_url": judge.base_url, "model": judge.model, "sampling": judge.sampling}
    (results_dir / "judge.json").write_text(
        json.dumps({"judge": meta, "summary": summary, "judgements": judgements}, indent=1)
    )
    fields = ["model", "context_tokens", "depth", "trial", "answer", "correct", "score", "status", "attempts"]
    with (results_dir / "judge.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + ["feedback"])
        writer.writeheader()
        for j in judgements:
            writer.writerow({k: j[k] for k in fields + ["feedback"]})
    lines = [
        f"judge {judge.model} @ {judge.base_url}: {summary['judged']} judged, {summary['valid']} valid, "
        f"{summary['malformed']} malformed {summary['statuses']}"
    ]
    for model, stats in summary["models"].items():
        mean = "n/a" if stats["mean_score"] is None else f"{stats['mean_score']:.2f}"
        lines.append(
            f"{model}: mean score {mean} over {stats['scored']} valid verdicts; by length {stats['by_length']}"
        )
    (results_dir / "judge_summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def build_judge(cfg: Any) -> OpenAICompatibleJudge:
    """An :class:`OpenAICompatibleJudge` from a config mapping (``base_url``, ``model``, optional sampling keys)."""
    cfg = dict(cfg)
    missing = [k for k in ("base_url", "model") if not cfg.get(k)]
    if missing:
        raise ValueError(f"judge config is missing {missing} (e.g. base_url: http://localhost:8000/v1)")
    return OpenAICompatibleJudge(cfg.pop("base_url"), cfg.pop("model"), **cfg)


def judge_config_run(cfg: Any) -> dict[str, Any]:
    """Grade an earlier passkey run from a config with ``results_dir`` and a ``judge`` block (``judge.yaml``)."""
    from omegaconf import OmegaConf

    if not cfg.get("results_dir"):
        raise ValueError("results_dir is not set: point it at a passkey_eval output_dir holding results.json")
    if not (Path(str(cfg.results_dir)) / "results.json").is_file():
        raise FileNotFoundError(f"results_dir={cfg.results_dir} holds no results.json; run the passkey recipe first")
    if cfg.get("judge") is None:
        raise ValueError("the config has no judge block (base_url, model, ...)")
    return judge_results(cfg.results_dir, build_judge(OmegaConf.to_container(cfg.judge, resolve=True)))


def main() -> None:
    from torchtune import config as tune_config

    tune_config.parse(judge_config_run)()


if __name__ == "__main__":
    main()
