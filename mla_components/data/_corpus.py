"""Offline text for calibration, healing and held-out perplexity (Python's own documentation), as a dataset.

Nothing may be downloaded at run time, so the text comes with Python itself: ``pydoc_data.topics`` (the language
reference's ~80 topics, ~0.5 MB of English prose with code, PSF licence) and the docstrings of standard-library
modules. The topics are split by name into disjoint ``calibration``/``train`` and ``heldout`` parts, so
perplexity is never measured on text the conversion or the healing saw.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import sys
import warnings
from typing import Any

from torch.utils.data import Dataset

SPLITS = ("train", "heldout")

# Standard-library packages whose docstrings add prose beyond the language reference (stable, no side effects).
_DOC_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
    "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def _split_of(name: str) -> str:
    """About one topic in six is held out, chosen by a hash of its name (stable across Python versions)."""
    return "heldout" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 6 == 0 else "train"


def reference_topics(split: str) -> list[str]:
    """Language-reference topics of ``split`` (``train`` or ``heldout``), sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if _split_of(name) == split]


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of a fixed list of standard-library modules (training text only)."""
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _DOC_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # pragma: no cover - a trimmed Python
                continue
            names = [module_name]
            if hasattr(module, "__path__"):
                names += [
                    m.name
                    for m in pkgutil.iter_modules(module.__path__, module_name + ".")
                    if not m.name.endswith("__main__")  # importing a __main__ runs it
                ]
            for name in names:
                mod = sys.modules.get(name)
                if mod is None:
                    try:
                        mod = importlib.import_module(name)
                    except Exception:  # noqa: BLE001 - optional submodules (platform-specific) are skipped
                        continue
                doc = inspect.getdoc(mod)
                parts = [doc] if doc else []
                for _, member in sorted(vars(mod).items()):
                    if (inspect.isclass(member) or inspect.isfunction(member)) and member.__module__ == name:
                        member_doc = inspect.getdoc(member)
                        if member_doc and len(member_doc) > 200:
                            parts.append(member_doc)
                if parts:
                    texts.append("\n\n".join(parts))
    return texts


def corpus_texts(split: str) -> list[str]:
    """``train``: the training topics and the stdlib docstrings; ``heldout``: the held-out topics only."""
    return reference_topics(split) + (stdlib_docstrings() if split == "train" else [])


class CorpusWindows(Dataset):
    """Fixed-length token windows of the offline corpus's ``split`` (documents joined by blank lines, then cut
    into consecutive ``seq_len`` windows); every token is supervised (``labels`` = ``tokens``, shifted by the
    recipe). Sample: ``{"tokens": list[int] (seq_len), "labels": list[int] (seq_len)}``.

    ``repeats`` > 1 cuts the stream again at offsets ``k * seq_len / repeats``, so the repeated text is seen in
    other contexts rather than as identical windows.
    """

    def __init__(self, tokenizer: Any, split: str = "train", seq_len: int = 1024, repeats: int = 1) -> None:
        for name, value, low in (("seq_len", seq_len, 2), ("repeats", repeats, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"dataset.{name} must be an integer >= {low}, got {value!r}")
        stream = tokenizer.encode("\n\n".join(corpus_texts(split)), add_bos=False, add_eos=False)
        if len(stream) < 2 * seq_len:
            raise ValueError(f"dataset.seq_len={seq_len} is over half the {split} corpus ({len(stream)} tokens)")
        self._windows = [
            stream[i : i + seq_len]
            for k in range(repeats)
            for i in range(k * seq_len // repeats, len(stream) - seq_len + 1, seq_len)
        ]

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        tokens = self._windows[index]
        return {"tokens": list(tokens), "labels": list(tokens)}


def corpus_dataset(tokenizer: Any, split: str = "train", seq_len: int = 1024, repeats: int = 1) -> CorpusWindows:
    """Dataset component for configs: ``dataset: {_component_: mla_components.data.corpus_dataset, seq_len: 2048}``."""
    return CorpusWindows(tokenizer, split=split, seq_len=seq_len, repeats=repeats)
