"""Needle-in-a-haystack preference (DPO) dataset in the format of Torchtune's ``PreferenceDataset``.

The prompt is haystack + question; ``chosen`` answers with the needle value, ``rejected`` with a hallucination:

- ``wrong_digits``: the value with one or two digits changed (a number that occurs nowhere in the prompt);
- ``distractor``: the value of another needle in the same haystack (``multi`` needles only);
- ``haystack_value``: a needle-shaped number that occurs in the filler (every haystack holds at least one);
- ``digit_count``: the value's digits with one left out, a run of 1-3 of them repeated, or the last digit repeated
  2-6 more times as if the answer did not stop (``5873``, ``5873939`` or ``58739999`` for ``58739``), the copy
  errors of long-range retrieval; never a number of the prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from mla_components.data._haystack import NeedleSample, sample_rng
from mla_components.data._sft import NeedleSamples

REJECTION_KINDS = ("wrong_digits", "distractor", "haystack_value", "digit_count")


def _applies(rejection: str, needle_kind: str) -> bool:
    return rejection != "distractor" or needle_kind == "multi"


def hallucinated_answer(rng: random.Random, sample: NeedleSample, rejection: str) -> str:
    """A wrong answer for ``sample`` of the given origin (see the module docstring)."""
    if rejection == "distractor":
        if not sample.distractors:
            raise ValueError(f"a {sample.kind!r} sample has no distractor needle; use needle kind 'multi'")
        return rng.choice(sample.distractors)
    if rejection == "haystack_value":
        return rng.choice(sample.decoys)
    if rejection == "digit_count":
        return _miscounted(rng, sample)
    if rejection != "wrong_digits":
        raise ValueError(f"rejection kind must be one of {REJECTION_KINDS}, got {rejection!r}")
    while True:
        digits = list(sample.answer)
        for position in rng.sample(range(len(digits)), rng.choice((1, 2))):
            choices = [d for d in "0123456789" if d != digits[position] and (position or d != "0")]
            digits[position] = rng.choice(choices)
        wrong = "".join(digits)
        if wrong not in sample.prompt:  # never another value of the haystack: that is a different rejection kind
            return wrong


def _miscounted(rng: random.Random, sample: NeedleSample) -> str:
    answer = sample.answer
    while True:
        at = rng.randrange(len(answer))
        error = rng.randrange(3)
        if error == 0 and len(answer) > 2:
            wrong = answer[:at] + answer[at + 1 :]
        elif error == 1:
            wrong = answer + answer[-1] * rng.randint(2, 6)
        else:
            run = rng.randint(1, min(3, len(answer) - at))
            wrong = answer[: at + run] + answer[at : at + run] + answer[at + run :]
        if wrong[0] != "0" and not re.search(rf"(?<!\d){wrong}(?!\d)", sample.prompt):
            return wrong


class NeedleDPODataset(NeedleSamples):
    """Map-style preference dataset; item ``i`` is a pure function of (split, seed, i).

    Items are ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`` (lists of ints;
    labels are ``CROSS_ENTROPY_IGNORE_IDX`` on the prompt), what ``full_dpo_distributed`` and
    ``padded_collate_dpo`` consume. Arguments are those of :func:`needle_dpo_dataset`.
    """

    stream = "dpo"
    # a rejected answer has up to 6 digits more than the value (a last digit repeated 6 more times; a 7-digit
    # distractor for a 4-digit value): the sample is sized so that both sides fit context_tokens
    answer_reserve = 6

    def __init__(self, tokenizer: Any, *, rejection_kinds: Sequence[str] = REJECTION_KINDS, **sampling: Any) -> None:
        sampling.setdefault("needle_kinds", ("passkey", "kv", "multi"))
        super().__init__(tokenizer, **sampling)
        rejections = (rejection_kinds,) if isinstance(rejection_kinds, str) else tuple(rejection_kinds)
        bad = [r for r in rejections if r not in REJECTION_KINDS]
        if not rejections or bad:
            raise ValueError(
                f"rejection_kinds must be a non-empty subset of {REJECTION_KINDS}, got {rejection_kinds!r}"
            )
        for kind in self._kinds:
            if not any(_applies(rejection, kind) for rejection in rejections):
                raise ValueError(f"needle kind {kind!r} has no applicable rejection in rejection_kinds={rejections}")
        self._rejections = rejections

    def preference(self, index: int) -> tuple[NeedleSample, str, str]:
        """``(sample, rejected answer, rejection kind)`` behind item ``index``."""
        sample = self.needle_sample(index)
        rejection_rng = sample_rng(self._split, self._seed, "dpo-rejection", index)
        rejection = rejection_rng.choice([r for r in self._rejections if _applies(r, sample.kind)])
        return sample, hallucinated_answer(rejection_rng, sample, rejection), rejection

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample, rejected, _ = self.preference(index)
        chosen_input_ids, chosen_labels = self.training_tokens(index, sample, sample.answer)
        rejected_input_ids, rejected_labels = self.training_tokens(index, sample, rejected)
        return dict(
            chosen_input_ids=chosen_input_ids,
            chosen_labels=chosen_labels,
            rejected_input_ids=rejected_input_ids,
            rejected_labels=rejected_labels,
        )


def needle_dpo_dataset(
    tokenizer: Any,
    *,
    num_samples: int,
    context_tokens: int,
    depth: float | None = None,
    needle_kinds: Sequence[str] = ("passkey", "kv", "multi"),
    rejection_kinds: Sequence[str] = REJECTION_KINDS,
    seed: int = 0,
    split: str = "train",
    haystacks: Sequence[str] = ("synthetic",),
    prompt_formats: Sequence[str] = ("chat",),
) -> NeedleDPODataset:
    """Synthetic needle preference pairs for Torchtune's DPO recipes (``full_dpo_distributed``).

    YAML::

        dataset:
          _component_: mla_components.data.needle_dpo_dataset
          num_samples: 128
          context_tokens: 512
          needle_kinds: [passkey, kv, multi]

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (the recipe passes it).
        num_samples (int): dataset length.
        context_tokens (int | Sequence[int]): length of the chosen sequence, in tokens (met exactly or a few tokens
            below; the rejected one has the same length for the byte tokenizer, +-1 token for BPE tokenizers); a
            list mixes lengths.
        depth (float | None): needle depth in [0, 1]; None samples it per sample. Default None.
        needle_kinds (Sequence[str]): kinds among ``passkey``, ``kv``, ``multi``, cycled over samples.
        rejection_kinds (Sequence[str]): hallucinations to draw from, among :data:`REJECTION_KINDS`
            drawn uniformly among those that apply to the sample's kind: ``distractor`` applies to ``multi``
            samples only and is skipped for the others.
        seed (int): item ``i`` depends only on (split, seed, i).
        split (str): ``"train"`` (default) or ``"eval"`` vocabulary.
        haystacks, prompt_formats (Sequence[str]): as in :func:`needle_sft_dataset`; both answers of a pair share
            the sample's haystack and format.

    Returns:
        NeedleDPODataset: the dataset.

    Raises:
        ValueError: bad argument (named).
    """
    return NeedleDPODataset(
        tokenizer,
        num_samples=num_samples,
        context_tokens=context_tokens,
        depth=depth,
        needle_kinds=needle_kinds,
        rejection_kinds=rejection_kinds,
        seed=seed,
        split=split,
        haystacks=haystacks,
        prompt_formats=prompt_formats,
    )
