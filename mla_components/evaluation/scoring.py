"""Scoring of needle retrieval: extract the needle value from generated text, compare exactly, aggregate per cell.

Extraction rule (the one docs/evaluation.md states): the model's value is the **first maximal run of ASCII digits**
in the generated text (Landmark/YaRN's passkey scoring: "the first integer"). Every needle kind of
``mla_components.data`` (``passkey``, ``kv``, ``multi``) has a numeric value, so one rule covers them.

The generated text is the decoded continuation up to (excluding) the first stop token, with special tokens removed.
A trial is correct when the extracted digits equal the needle's value exactly: ``"71432."`` and ``"The pass key is
71432"`` are correct for ``71432``; ``"714320"``, ``"71 432"``, ``"7143"`` and ``"no idea"`` are not, and a distractor
or decoy value earlier in the text makes the answer wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]+")


def extract_value(generated: str) -> str | None:
    """The first maximal run of ASCII digits in ``generated`` (None if it has none)."""
    match = _DIGITS.search(generated)
    return match.group(0) if match else None


def is_correct(generated: str, answer: str) -> bool:
    """Exact match of the extracted value against the needle's value (a string of ASCII digits)."""
    if not (answer.isascii() and answer.isdigit()):
        raise ValueError(f"needle answer {answer!r} is not a string of digits; the digit-run scoring cannot apply")
    return extract_value(generated) == answer


@dataclass(frozen=True)
class CellScore:
    """Accuracy of one (context length, depth) cell over its trials."""

    context_tokens: int
    depth: float
    trials: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0


def aggregate_cells(trials: Iterable[dict]) -> list[CellScore]:
    """Per-cell scores from per-trial records (each with ``context_tokens``, ``depth`` and ``correct``), sorted by
    length then depth."""
    counts: dict[tuple[int, float], list[int]] = {}
    for trial in trials:
        key = (int(trial["context_tokens"]), float(trial["depth"]))
        total_correct = counts.setdefault(key, [0, 0])
        total_correct[0] += 1
        total_correct[1] += int(bool(trial["correct"]))
    return [CellScore(length, depth, n, c) for (length, depth), (n, c) in sorted(counts.items())]
