"""The standard passkey prompt of Landmark Attention (Mohtashami & Jaggi, 2023) and LongLoRA / YaRN: an
evaluation-only format, never used for training, so a model tuned on the project's own templates is also measured
on text it has not seen.

The prompt is plain text (no chat template), encoded as transformers' tokenizer call encodes it (no BOS added),
and the answer is the first integer of the greedy continuation of "... The pass key is".
"""

from __future__ import annotations

import random
from typing import Any

from mla_components.data import NeedleSample

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def landmark_sample(tokenizer: Any, *, context_tokens: int, depth: float, seed: int) -> tuple[list[int], NeedleSample]:
    """``(prompt ids, sample)``: a fresh 5-digit pass key after ``round(depth * n)`` of the ``n`` filler
    repetitions that bring the prompt closest to ``context_tokens`` without exceeding it.

    Raises:
        ValueError: ``context_tokens`` cannot hold the prompt with one filler sentence.
    """
    value = str(random.Random(seed).randint(10_000, 99_999))
    needle = NEEDLE.format(value=value)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    def render(before: int, after: int) -> str:
        return " ".join([INTRO, *[FILLER] * before, needle, *[FILLER] * after]) + "\n" + QUESTION

    per_filler = len(encode(" " + FILLER))
    repeats = max(1, (context_tokens - len(encode(render(0, 0)))) // per_filler)
    before = round(depth * repeats)
    text = render(before, repeats - before)
    while repeats > 1 and len(encode(text)) > context_tokens:  # token merges at the joins can add a few
        repeats -= 1
        before = round(depth * repeats)
        text = render(before, repeats - before)
    if len(encode(text)) > context_tokens:
        raise ValueError(
            f"context_lengths: {context_tokens} tokens cannot hold the landmark prompt (it needs "
            f"{len(encode(text))} with one filler sentence); use longer context_lengths"
        )
    context, _, question = text.rpartition("\n")
    sample = NeedleSample(context=context, question=question, answer=value, depth=depth, kind="passkey")
    return encode(text), sample
