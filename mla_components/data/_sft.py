"""Needle-in-a-haystack SFT dataset as a Torchtune dataset component (``{"tokens", "labels"}`` samples)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset

from mla_components.data._haystack import (
    NeedleSample,
    build_needle_sample,
    minimum_context_tokens,
    needle_messages,
    sample_rng,
    validate_needle_args,
)


def validate_dataset_args(
    tokenizer: Any, *, num_samples: Any, context_tokens: Any, depth: Any, needle_kinds: Any, split: Any
) -> tuple[str, ...]:
    """Check a needle dataset's arguments before any sample is built; returns ``needle_kinds`` as a tuple.

    Raises:
        ValueError: naming the bad field: wrong type/range, a context too small for the needle(s), question and
            answer of some kind, or a ``tokenizer.max_seq_len`` that would truncate the answer away.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    validate_needle_args(tokenizer, context_tokens=context_tokens, depth=depth, needle_kinds=needle_kinds, split=split)
    kinds = (needle_kinds,) if isinstance(needle_kinds, str) else tuple(needle_kinds)
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if max_seq_len is not None and max_seq_len < context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} exceeds tokenizer.max_seq_len={max_seq_len}: the tokenizer would cut "
            "the answer off; lower context_tokens or raise tokenizer.max_seq_len"
        )
    for kind in kinds:
        needed = minimum_context_tokens(tokenizer, kind=kind, split=split, answer_in_length=True)
        if context_tokens < needed:
            raise ValueError(
                f"context_tokens={context_tokens} is too small for needle kind {kind!r}: the needle(s), question and "
                f"answer need up to {needed} tokens of this tokenizer; set context_tokens >= {needed}"
            )
    return kinds


class NeedleSamples(Dataset):
    """What the SFT and DPO needle datasets share: validated arguments, the length, and the needle sample behind an
    index, a pure function of (split, seed, ``stream``, index). Kinds cycle with the index."""

    stream = ""  # names the dataset's own random stream, so SFT and DPO samples are independent

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_samples: int,
        context_tokens: int,
        depth: float | None,
        needle_kinds: Sequence[str],
        seed: int,
        split: str,
    ) -> None:
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
        self._context_tokens = context_tokens
        self._depth = depth
        self._seed = seed
        self._split = split

    def __len__(self) -> int:
        return self._num_samples

    def needle_sample(self, index: int) -> NeedleSample:
        """The :class:`NeedleSample` behind item ``index``."""
        if not 0 <= index < self._num_samples:
            raise IndexError(f"index {index} out of range for {self._num_samples} samples")
        return build_needle_sample(
            self._tokenizer,
            sample_rng(self._split, self._seed, self.stream, index),
            target_tokens=self._context_tokens,
            depth=self._depth,
            kind=self._kinds[index % len(self._kinds)],
            split=self._split,
            answer_in_length=True,
        )


class NeedleSFTDataset(NeedleSamples):
    """Map-style dataset of needle-in-a-haystack chats; sample ``i`` is a pure function of (split, seed, i).

    Each sample is ``{"tokens": list[int], "labels": list[int]}`` of equal length <= ``context_tokens``, like
    Torchtune's ``SFTDataset``: labels are ``CROSS_ENTROPY_IGNORE_IDX`` where the tokenizer's mask is True (the
    prompt unless ``train_on_input``, and bos/eos), the token id elsewhere. Kinds cycle with ``i``.
    Arguments are those of :func:`needle_sft_dataset`.
    """

    stream = "sft"

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_samples: int,
        context_tokens: int,
        depth: float | None = None,
        needle_kinds: Sequence[str] = ("passkey",),
        seed: int = 0,
        split: str = "train",
        train_on_input: bool = False,
    ) -> None:
        super().__init__(
            tokenizer,
            num_samples=num_samples,
            context_tokens=context_tokens,
            depth=depth,
            needle_kinds=needle_kinds,
            seed=seed,
            split=split,
        )
        self._train_on_input = train_on_input

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.needle_sample(index)
        messages = needle_messages(sample, sample.answer, train_on_input=self._train_on_input)
        tokenized = self._tokenizer({"messages": messages})
        tokens, mask = tokenized["tokens"], tokenized["mask"]
        labels = [CROSS_ENTROPY_IGNORE_IDX if masked else token for token, masked in zip(tokens, mask, strict=True)]
        return {"tokens": tokens, "labels": labels}


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
        context_tokens (int): length of each chat (prompt + answer + end tokens), in tokens; met exactly or a few
            tokens below.
        depth (float | None): needle depth in [0, 1]; None samples it per sample. Default None.
        needle_kinds (Sequence[str]): kinds among ``passkey``, ``kv``, ``multi``, cycled over samples.
        seed (int): sample ``i`` depends only on (split, seed, i), so resumed and sharded runs see the same data.
        split (str): ``"train"`` (default) or ``"eval"`` word lists, names and templates (disjoint).
        packed (bool): pack samples into ``tokenizer.max_seq_len``-long sequences with Torchtune's
            ``PackedDataset`` (the recipe then uses ``padded_collate_packed``). Default False.
        train_on_input (bool): also train on the prompt tokens. Default False.

    Returns:
        NeedleSFTDataset | PackedDataset: the dataset.

    Raises:
        ValueError: bad argument (named), e.g. ``context_tokens`` too small for the needle and question.
    """
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
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
    )
    if not packed:
        return dataset
    return PackedDataset(dataset, max_seq_len=max_seq_len, padding_idx=getattr(tokenizer, "pad_id", 0))
