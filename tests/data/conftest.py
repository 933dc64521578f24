"""Shared fixtures for the data tests: the byte tokenizer and a real Torchtune Llama 3 tokenizer over a tiny BPE."""

import base64
import collections

import pytest

from mla_components.data import byte_tokenizer, make_needle_sample
from tests._requirements import require_module

NUM_MERGES = 400


def _train_byte_bpe(text: str, num_merges: int) -> list[bytes]:
    """Plain byte-pair-encoding training on space-prefixed words; returns the merged tokens in merge order."""
    words = collections.Counter(f" {word}".encode() for word in text.split())
    splits = {word: [bytes([b]) for b in word] for word in words}
    merged: list[bytes] = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            parts = splits[word]
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        merged.append(left + right)
        for word, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[word] = out
    return merged


@pytest.fixture(scope="session")
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def llama3_tok(tmp_path_factory):
    """Torchtune's real ``llama3_tokenizer`` (tiktoken, Llama 3 regex and special tokens) on a BPE trained here.

    The real Llama 3 file is a gated download; a tiny merge table trained on haystack text of both splits
    exercises the same code path, with multi-byte tokens that merge across characters.
    """
    llama3 = require_module("torchtune.models.llama3", "torchtune is a dependency")
    corpus = " ".join(
        make_needle_sample(byte_tokenizer(), context_tokens=3000, depth=0.5, kind=kind, seed=seed, split=split).prompt
        for split in ("train", "eval")
        for seed, kind in enumerate(("passkey", "kv", "multi"))
    )
    tokens = [bytes([b]) for b in range(256)] + _train_byte_bpe(corpus, NUM_MERGES)
    path = tmp_path_factory.mktemp("llama3_tiny") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens)))
    return llama3.llama3_tokenizer(str(path))
