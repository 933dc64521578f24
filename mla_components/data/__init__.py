"""Tokenizer and synthetic long-context (needle-in-a-haystack) datasets for the MLA models.

- :func:`byte_tokenizer`: byte-level Torchtune ``ModelTokenizer`` with a Llama-3-like chat format, savable as HF files.
- :func:`hf_tokenizer`: a real model's HF tokenizer and chat template (e.g. SmolLM2's ChatML) as a ``ModelTokenizer``.
- :func:`make_needle_sample` / :func:`needle_prompt_tokens`: one haystack sample sized in tokens (evaluation).
- :func:`corpus_dataset` / :func:`corpus_texts`: offline text (Python's documentation) for calibration and healing.
- :func:`needle_sft_dataset` / :func:`needle_dpo_dataset`: Torchtune dataset components for the SFT and DPO recipes;
  :func:`padded_collate_positions` collates SFT samples with their (PoSE-skipped) ``input_pos``.
"""

from mla_components.data._corpus import CorpusWindows, corpus_dataset, corpus_texts
from mla_components.data._dpo import REJECTION_KINDS, NeedleDPODataset, hallucinated_answer, needle_dpo_dataset
from mla_components.data._haystack import (
    NEEDLE_KINDS,
    SPLITS,
    NeedleSample,
    make_needle_sample,
    needle_messages,
    needle_prompt_tokens,
)
from mla_components.data._hf_tokenizer import HFModelTokenizer, hf_tokenizer
from mla_components.data._sft import NeedleSFTDataset, needle_sft_dataset, padded_collate_positions
from mla_components.data._tokenizer import ByteTokenizer, byte_tokenizer

__all__ = [
    "NEEDLE_KINDS",
    "REJECTION_KINDS",
    "SPLITS",
    "ByteTokenizer",
    "CorpusWindows",
    "HFModelTokenizer",
    "NeedleDPODataset",
    "NeedleSFTDataset",
    "NeedleSample",
    "byte_tokenizer",
    "corpus_dataset",
    "corpus_texts",
    "hallucinated_answer",
    "hf_tokenizer",
    "make_needle_sample",
    "needle_dpo_dataset",
    "needle_messages",
    "needle_prompt_tokens",
    "needle_sft_dataset",
    "padded_collate_positions",
]
