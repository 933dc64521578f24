"""Needle-in-a-haystack SFT dataset as a Torchtune dataset component (``{"tokens", "labels"}`` samples)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.datasets import PackedDataset

from mla_components._validation import is_positive_int
from mla_components.data._haystack import (
    HAYSTACKS,
    NeedleSample,
    build_needle_sample,
    minimum_context_tokens,
    needle_messages,
    sample_rng,
    validate_needle_args,
)
from mla_components.data._word_lists import VOCABULARIES

# How a training sequence is rendered: the model's chat template (user turn, assistant answer) or plain text that
# ends with an answer cue and continues with the value (the form of completion-style passkey prompts).
PROMPT_FORMATS = ("chat", "plain")


def _as_tuple(value: Any) -> tuple:
    return (value,) if isinstance(value, str | int) else tuple(value)


def _choices(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` (one name or a list) as a non-empty tuple of names from ``allowed``, or a ValueError naming it."""
    values = _as_tuple(value)
    if not values or any(v not in allowed for v in values):
        raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {value!r}")
    return values


def validate_dataset_args(
    tokenizer: Any, *, num_samples: Any, context_tokens: Any, depth: Any, needle_kinds: Any, split: Any
) -> tuple[str, ...]:
    """Check a needle dataset's arguments before any sample is built; returns ``needle_kinds`` as a tuple.

    Raises:
        ValueError: naming the bad field: wrong type/range, a context too small for the needle(s), question and
            answer of some kind, or a ``tokenizer.max_seq_len`` that would truncate the answer away.
    """
    if not is_positive_int(num_samples):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    lengths = _as_tuple(context_tokens)
    if not lengths:
        raise ValueError("context_tokens must be a positive int or a non-empty list of them, got []")
    for length in lengths:
        validate_needle_args(tokenizer, context_tokens=length, depth=depth, needle_kinds=needle_kinds, split=split)
    kinds = (needle_kinds,) if isinstance(needle_kinds, str) else tuple(needle_kinds)
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if max_seq_len is not None and max_seq_len < max(lengths):
        raise ValueError(
            f"context_tokens={max(lengths)} exceeds tokenizer.max_seq_len={max_seq_len}: the tokenizer would cut "
            "the answer off; lower context_tokens or raise tokenizer.max_seq_len"
        )
    for kind in kinds:
        needed = minimum_context_tokens(tokenizer, kind=kind, split=split, answer_in_length=True)
        if min(lengths) < needed:
            raise ValueError(
                f"context_tokens={min(lengths)} is too small for needle kind {kind!r}: the needle(s), question and "
                f"answer need up to {needed} tokens of this tokenizer; set context_tokens >= {needed}"
            )
    return kinds


def skipped_positions(rng: Any, length: int, position_range: int) -> list[int]:
    """Position ids for a ``length``-token sequence that span up to ``position_range`` (PoSE, Zhu et al. 2023): the
    sequence is cut once at a random point and the second part's positions jump ahead by a random skip, so training
    on short sequences shows the distances (rotary angles) of long ones. Increasing, all ``< position_range``."""
    cut = rng.randint(1, length - 1) if length > 1 else length
    skip = rng.randint(0, position_range - length)
    return list(range(cut)) + list(range(cut + skip, length + skip))


class NeedleSamples(Dataset):
    """What the SFT and DPO needle datasets share: validated arguments, the length, and the needle sample behind an
    index, a pure function of (split, seed, ``stream``, index). Kinds cycle with the index; the length (one of
    ``context_tokens``), the haystack and the prompt format are drawn per index from their lists. The arguments are
    the sampling ones of :func:`needle_sft_dataset`; the subclasses take them as keywords and add their own."""

    stream = ""  # names the dataset's own random stream, so SFT and DPO samples are independent
    answer_reserve = 0  # tokens a sample leaves free for an answer longer than its own (DPO's rejected ones)

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_samples: int,
        context_tokens: int | Sequence[int],
        depth: float | None = None,
        needle_kinds: Sequence[str] = ("passkey",),
        seed: int = 0,
        split: str = "train",
        haystacks: Sequence[str] = ("synthetic",),
        prompt_formats: Sequence[str] = ("chat",),
    ) -> None:
        self._haystacks = _choices("haystacks", haystacks, HAYSTACKS)
        self._prompt_formats = _choices("prompt_formats", prompt_formats, PROMPT_FORMATS)
        self._kinds = validate_dataset_args(
            tokenizer,
            num_samples=num_samples,
            context_tokens=context_tokens,
            depth=depth,
            needle_kinds=needle_kinds,
            split=split,
        )
        self._tokenizer = tokenizer
        self._num_samples = num_samples
        self._context_tokens = _as_tuple(context_tokens)
        self._depth = depth
        self._seed = seed
        self._split = split

    def __len__(self) -> int:
        return self._num_samples

    def _variant(self, index: int) -> tuple[int, str, str, str]:
        """``(length, haystack, prompt format, answer cue)`` of item ``index``, from a stream of their own (so the
        needle draws of single-choice datasets do not depend on these lists)."""
        rng = sample_rng(self._split, self._seed, self.stream, "variant", index)
        cues = VOCABULARIES[self._split].answer_cues
        return (
            rng.choice(self._context_tokens),
            rng.choice(self._haystacks),
            rng.choice(self._prompt_formats),
            rng.choice(cues),
        )

    def needle_sample(self, index: int) -> NeedleSample:
        """The :class:`NeedleSample` behind item ``index``."""
        if not 0 <= index < self._num_samples:
            raise IndexError(f"index {index} out of range for {self._num_samples} samples")
        length, haystack, _, _ = self._variant(index)
        return build_needle_sample(
            self._tokenizer,
            sample_rng(self._split, self._seed, self.stream, index),
            target_tokens=length - self.answer_reserve,
            depth=self._depth,
            kind=self._kinds[index % len(self._kinds)],
            split=self._split,
            answer_in_length=True,
            haystack=haystack,
        )

    def training_tokens(self, index: int, sample: NeedleSample, answer: str, train_on_input: bool = False):
        """``(tokens, labels)`` of ``sample`` answered with ``answer``, in item ``index``'s prompt format.

        ``chat``: the tokenizer's chat template, labels on the assistant turn (and the prompt if
        ``train_on_input``). ``plain``: ``context, question and answer cue`` as plain text (no BOS, as a
        completion prompt is encoded), then `` answer`` and EOS, labels on those.
        """
        _, _, prompt_format, cue = self._variant(index)
        if prompt_format == "chat":
            tokens, mask = self._tokenizer.tokenize_messages(
                needle_messages(sample, answer, train_on_input=train_on_input)
            )
        else:
            separator = sample_rng(self._split, self._seed, self.stream, "separator", index).choice(["\n", "\n\n", " "])
            prompt = self._tokenizer.encode(f"{sample.context}{separator}{sample.question} {cue}", False, False)
            reply = self._tokenizer.encode(" " + answer, False, False) + [self._tokenizer.eos_id]
            tokens, mask = prompt + reply, [not train_on_input] * len(prompt) + [False] * len(reply)
        labels = [CROSS_ENTROPY_IGNORE_IDX if masked else token for token, masked in zip(tokens, mask, strict=True)]
        return tokens, labels


class NeedleSFTDataset(NeedleSamples):
    """Map-style dataset of needle-in-a-haystack chats; sample ``i`` is a pure function of (split, seed, i).

    Each sample is ``{"tokens": list[int], "labels": list[int]}`` of equal length <= ``context_tokens``, like
    Torchtune's ``SFTDataset``: labels are ``CROSS_ENTROPY_IGNORE_IDX`` where the tokenizer's mask is True (the
    prompt unless ``train_on_input``, and bos/eos), the token id elsewhere. Kinds cycle with ``i``.
    Arguments are those of :func:`needle_sft_dataset`.
    """

    stream = "sft"

    def __init__(
        self, tokenizer: Any, *, train_on_input: bool = False, position_range: int | None = None, **sampling: Any
    ) -> None:
        super().__init__(tokenizer, **sampling)
        longest = max(self._context_tokens)
        if position_range is not None and (not is_positive_int(position_range) or position_range < longest):
            raise ValueError(
                f"position_range must be an int >= the longest context_tokens ({longest}), got {position_range!r}; "
                "or null for positions 0..len-1"
            )
        self._train_on_input = train_on_input
        self._position_range = position_range

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.needle_sample(index)
        tokens, labels = self.training_tokens(index, sample, sample.answer, self._train_on_input)
        max_seq_len = getattr(self._tokenizer, "max_seq_len", None)
        if max_seq_len is not None and len(tokens) > max_seq_len:  # as the tokenizer's own truncation would
            tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
        item = {"tokens": tokens, "labels": labels}
        if self._position_range is not None:
            rng = sample_rng(self._split, self._seed, self.stream, "positions", index)
            item["input_pos"] = skipped_positions(rng, len(tokens), self._position_range)
        return item


def needle_sft_dataset(
    tokenizer: Any,
    *,
    num_samples: int,
    context_tokens: int,
    depth: float | None = None,
    needle_kinds: Sequence[str] = ("passkey",),
    seed: int = 0,
    split: str = "train",
    packed: bool = False,
    train_on_input: bool = False,
    haystacks: Sequence[str] = ("synthetic",),
    prompt_formats: Sequence[str] = ("chat",),
    position_range: int | None = None,
) -> NeedleSFTDataset | PackedDataset:
    """Synthetic needle-in-a-haystack SFT data, for Torchtune's SFT recipes.

    YAML::

        dataset:
          _component_: mla_components.data.needle_sft_dataset
          num_samples: 256
          context_tokens: 256
          needle_kinds: [passkey, kv]
          packed: False

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (the recipe passes it).
        num_samples (int): dataset length.
        context_tokens (int | Sequence[int]): length of each chat (prompt + answer + end tokens), in tokens; met
            exactly or a few tokens below. A list mixes lengths: each sample draws one.
        depth (float | None): needle depth in [0, 1]; None samples it per sample. Default None.
        needle_kinds (Sequence[str]): kinds among ``passkey``, ``kv``, ``multi``, cycled over samples.
        seed (int): sample ``i`` depends only on (split, seed, i), so resumed and sharded runs see the same data.
        split (str): ``"train"`` (default) or ``"eval"`` word lists, names and templates (disjoint).
        packed (bool): pack samples into ``tokenizer.max_seq_len``-long sequences with Torchtune's
            ``PackedDataset`` (the recipe then uses ``padded_collate_packed``). Default False.
        train_on_input (bool): also train on the prompt tokens. Default False.
        haystacks (Sequence[str]): filler sources drawn per sample, among ``synthetic`` (word-list sentences),
            ``corpus`` (consecutive prose of the offline corpus, the split's own part) and ``repeat`` (a few
            sentences repeated). Default ``[synthetic]``.
        prompt_formats (Sequence[str]): drawn per sample, among ``chat`` (the tokenizer's chat template) and
            ``plain`` (plain text ending with an answer cue, then the value). Default ``[chat]``.
        position_range (int | None): give each sample ``input_pos`` that skip ahead once (PoSE) so they span up to
            this many positions; needs the collate function :func:`padded_collate_positions` (config
            ``collate_fn: mla_components.data.padded_collate_positions``) and ``packed: False``. Default None.

    Returns:
        NeedleSFTDataset | PackedDataset: the dataset.

    Raises:
        ValueError: bad argument (named), e.g. ``context_tokens`` too small for the needle and question.
    """
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if packed and position_range is not None:
        raise ValueError("position_range needs packed=False (packing writes its own input_pos)")
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs tokenizer.max_seq_len (the pack length); set it in the tokenizer config")
    dataset = NeedleSFTDataset(
        tokenizer,
        num_samples=num_samples,
        context_tokens=context_tokens,
        depth=depth,
        needle_kinds=needle_kinds,
        seed=seed,
        split=split,
        train_on_input=train_on_input,
        haystacks=haystacks,
        prompt_formats=prompt_formats,
        position_range=position_range,
    )
    if not packed:
        return dataset
    return PackedDataset(dataset, max_seq_len=max_seq_len, padding_idx=getattr(tokenizer, "pad_id", 0))


def padded_collate_positions(
    batch: list[dict[str, list[int]]], padding_idx: int = 0, ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX
) -> dict[str, torch.Tensor]:
    """Torchtune's ``padded_collate_sft`` plus ``input_pos`` ``[b, s]``: a sample's own positions (from
    ``position_range``) or ``0..len-1``, continued past its end over the padding. The SFT recipes pass every batch
    key but ``labels`` to the model, so these positions reach its RoPE."""
    collated = padded_collate_sft(batch, padding_idx=padding_idx, ignore_idx=ignore_idx)
    width = collated["tokens"].shape[1]
    rows = []
    for item in batch:
        positions = list(item.get("input_pos") or range(len(item["tokens"])))
        start = positions[-1] + 1 if positions else 0
        rows.append(positions + list(range(start, start + width - len(positions))))
    collated["input_pos"] = torch.tensor(rows, dtype=torch.long)
    return collated
