"""Needle-in-a-haystack samples: procedural filler text sized in tokens of any Torchtune ``ModelTokenizer``.

One generator serves the SFT/DPO training datasets and the evaluation recipe. A sample is an introduction, filler
sentences drawn offline from embedded word lists (:mod:`._word_lists`), one or more needles inserted at a depth, and a
question whose answer is the exact needle value. The rendered chat (user: ``context + "\\n\\n" + question``,
assistant: the value) is sized to the requested number of tokens:

1. draw needles, question and one decoy sentence; the chat without filler gives the base length;
2. add filler sentences, counting each one's tokens on its own (encoding ``" " + sentence``: exact for byte-level and
   regex-pretokenised BPE tokenizers such as Llama 3's, whose pieces split at these spaces), then close the last gap
   word by word;
3. place the needles where the filler tokens before them are ``depth`` of the total, render once, and drop trailing
   filler sentences in the rare case a tokenizer merged across a boundary and overshot.

So a 128k-token sample costs one pass over its sentences plus one or two full encodes, never one per step.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchtune.data import Message

from mla_components._validation import is_positive_int
from mla_components.data._word_lists import VOCABULARIES, SplitVocabulary

NEEDLE_KINDS = ("passkey", "kv", "multi")
SPLITS = tuple(VOCABULARIES)
# Where the filler comes from: the word-list sentences, consecutive prose of the offline corpus (the split's own
# part: train topics for "train", held-out topics for "eval"), or a few sentences repeated over and over.
HAYSTACKS = ("synthetic", "corpus", "repeat")
# A "repeat" haystack cycles this many distinct sentences.
REPEATED_SENTENCES = (2, 6)
# A multi-needle sample holds this many key-value needles (one asked about, the rest distractors).
MULTI_NEEDLE_COUNT = (3, 4)
# A sampled depth of the asked-about needle falls within EDGE_DEPTH_SPAN of either end this often (half each end):
# right after the instructions and right before the question are where long-context retrieval fails first
# (docs/results/long_context.md: depth 0% from 32k), and uniform depths put only 3% of needles in each end's 3%.
EDGE_DEPTH_SHARE = 0.3
EDGE_DEPTH_SPAN = 0.03
# One filler sentence in DECOY_EVERY carries a needle-shaped number (a plausible wrong answer).
DECOY_EVERY = 6
# Short words that close the last few tokens of the budget (shared by both splits; not content words).
_GAP_WORDS = ("and", "so", "a")
# Extra tokens required above the worst-case base length, for tokenizers whose piece counts are not additive.
_SAFETY_TOKENS = 4


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack example.

    Attributes:
        context (str): introduction + filler with the needle sentence(s) inserted.
        question (str): the question asked after the context.
        answer (str): the exact needle value that answers it (e.g. ``"71432"``).
        depth (float): where the asked-about needle sits, as the fraction of filler tokens before it (0..1).
        kind (str): ``"passkey"``, ``"kv"`` or ``"multi"``.
        distractors (tuple[str, ...]): values of the other needles (``multi`` only), each a wrong answer.
        decoys (tuple[str, ...]): needle-shaped numbers that occur in the filler, each a wrong answer.
    """

    context: str
    question: str
    answer: str
    depth: float
    kind: str
    distractors: tuple[str, ...] = ()
    decoys: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """The user turn: context, blank line, question."""
        return f"{self.context}\n\n{self.question}"


def needle_messages(sample: NeedleSample, answer: str | None = None, *, train_on_input: bool = False) -> list[Message]:
    """The chat for ``sample``: the user turn and an assistant turn holding ``answer`` (empty for generation).

    Args:
        sample (NeedleSample): the sample.
        answer (str | None): assistant content; None means the empty turn that a generation prompt ends with.
        train_on_input (bool): leave the user turn unmasked so it counts in the loss. Default False.

    Returns:
        list[Message]: ``[user, assistant]``.
    """
    return [
        Message(role="user", content=sample.prompt, masked=not train_on_input),
        Message(role="assistant", content="" if answer is None else answer, masked=False),
    ]


def untruncated(tokenizer: Any) -> Any:
    """A shallow copy of ``tokenizer`` with ``max_seq_len=None``, so that lengths can be measured past it."""
    if getattr(tokenizer, "max_seq_len", None) is None:
        return tokenizer
    clone = copy.copy(tokenizer)
    clone.max_seq_len = None
    return clone


def needle_prompt_tokens(tokenizer: Any, sample: NeedleSample) -> list[int]:
    """The generation prompt for ``sample``: chat-formatted, ending where the assistant's answer starts.

    Uses the tokenizer's Torchtune transform with ``inference=True`` (no end tokens), never truncated.

    Returns:
        list[int]: prompt ids, about ``context_tokens`` long for a sample made with :func:`make_needle_sample`.
    """
    return untruncated(tokenizer)({"messages": needle_messages(sample)}, inference=True)["tokens"]


def answer_tokens_length(tokenizer: Any, sample: NeedleSample, answer: str) -> int:
    """Length of the full training chat (prompt, ``answer``, end tokens) for ``sample``."""
    tokens, _ = untruncated(tokenizer).tokenize_messages(needle_messages(sample, answer))
    return len(tokens)


def sample_rng(split: str, seed: int, *key: Any) -> random.Random:
    """The random stream of one sample: a function of split, seed and key only (str seeds hash stably)."""
    return random.Random("/".join(["mla-needle", split, str(seed), *map(str, key)]))


def make_needle_sample(
    tokenizer: Any, *, context_tokens: int, depth: float | None, kind: str = "passkey", seed: int, split: str = "eval"
) -> NeedleSample:
    """Draw one needle-in-a-haystack sample whose generation prompt is ``context_tokens`` long.

    Args:
        tokenizer (ModelTokenizer): any Torchtune model tokenizer (byte, Llama 3, ...); lengths are in its tokens.
        context_tokens (int): target length of :func:`needle_prompt_tokens` (met exactly, or a few tokens below).
        depth (float | None): needle position in 0..1 (0 = right after the introduction); None samples it.
        kind (str): ``"passkey"``, ``"kv"`` or ``"multi"``. Default ``"passkey"``.
        seed (int): the sample is a function of (split, seed, arguments).
        split (str): ``"eval"`` (default) or ``"train"``: disjoint word lists, names and templates.

    Returns:
        NeedleSample: the sample.

    Raises:
        ValueError: on a bad argument, or when ``context_tokens`` cannot hold the needle(s) and question.
    """
    validate_needle_args(tokenizer, context_tokens=context_tokens, depth=depth, needle_kinds=(kind,), split=split)
    rng = sample_rng(split, seed, "eval-sample", context_tokens, kind, depth)
    return build_needle_sample(
        tokenizer, rng, target_tokens=context_tokens, depth=depth, kind=kind, split=split, answer_in_length=False
    )


def validate_needle_args(
    tokenizer: Any, *, context_tokens: Any, depth: Any, needle_kinds: Any, split: Any, field_prefix: str = ""
) -> None:
    """Raise ``ValueError`` naming the first bad argument (checked before any text is generated)."""
    if not callable(getattr(tokenizer, "tokenize_messages", None)) or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"tokenizer must be a Torchtune ModelTokenizer (tokenize_messages, encode), got {tokenizer!r}")
    if not is_positive_int(context_tokens):
        raise ValueError(f"{field_prefix}context_tokens must be a positive int (tokens), got {context_tokens!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int | float) or not 0 <= depth <= 1):
        raise ValueError(f"{field_prefix}depth must be a float in [0, 1] or None (sampled), got {depth!r}")
    kinds = (needle_kinds,) if isinstance(needle_kinds, str) else tuple(needle_kinds)
    bad = [k for k in kinds if k not in NEEDLE_KINDS]
    if not kinds or bad:
        raise ValueError(
            f"{field_prefix}needle_kinds must be a non-empty subset of {NEEDLE_KINDS}, got {needle_kinds!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"{field_prefix}split must be one of {SPLITS}, got {split!r}")


def minimum_context_tokens(tokenizer: Any, *, kind: str, split: str, answer_in_length: bool) -> int:
    """Smallest ``context_tokens`` that fits every draw of ``kind``: longest templates, names and decoy sentence."""
    vocab = VOCABULARIES[split]

    def longest(pool: tuple[str, ...], count: int = 4) -> tuple[str, ...]:
        return tuple(sorted(pool, key=len, reverse=True)[:count])

    templates = vocab.passkey_templates if kind == "passkey" else vocab.kv_templates
    worst = 0
    for template in templates:
        worst_vocab = dataclasses.replace(
            vocab,
            first_names=longest(vocab.first_names),
            last_names=longest(vocab.last_names),
            adjectives=longest(vocab.adjectives, 1),
            nouns=longest(vocab.nouns, 2),
            places=longest(vocab.places, 1),
            decoy_templates=longest(vocab.decoy_templates, 1),
            passkey_templates=(template,),
            kv_templates=(template,),
            value_digits=(vocab.value_digits[1],) * 2,
        )
        draft = _draw_needles(random.Random(0), worst_vocab, kind, depth=0.0, most_needles=True)
        decoy = _Filler(draft.decoy[0], 0, draft.decoy[1])
        worst = max(worst, _measure(untruncated(tokenizer), draft, [decoy], answer_in_length))
    return worst + _SAFETY_TOKENS


@dataclass
class _Draft:
    """Everything of a sample but the filler: needles (asked-about first), their depths, question, a decoy."""

    needles: list[str]
    depths: list[float]
    question: str
    answer: str
    kind: str
    distractors: tuple[str, ...]
    decoy: tuple[str, str]  # (sentence, value): the haystack always holds at least one decoy value
    vocab: SplitVocabulary
    taken_values: set[str]
    intro: str


@dataclass
class _Filler:
    text: str
    num_tokens: int
    decoy_value: str | None = None


def _draw_value(rng: random.Random, taken: set[str], digits: tuple[int, int]) -> str:
    """A fresh value of ``digits`` (low, high) decimal digits (the split's ``value_digits``; the Landmark passkeys
    have five), distinct from every value already in the sample."""
    low, high = digits
    while True:
        length = low if low == high else rng.randint(low, high)  # one fixed length draws as it always did
        value = str(rng.randint(10 ** (length - 1), 10**length - 1))
        if value not in taken:
            taken.add(value)
            return value


def _sample_depth(rng: random.Random) -> float:
    """A depth in [0, 1]: uniform, except that EDGE_DEPTH_SHARE of them lie within EDGE_DEPTH_SPAN of 0 or 1."""
    edge = rng.random()
    if edge < EDGE_DEPTH_SHARE / 2:
        return rng.random() * EDGE_DEPTH_SPAN
    if edge < EDGE_DEPTH_SHARE:
        return 1.0 - rng.random() * EDGE_DEPTH_SPAN
    return rng.random()


def _draw_needles(rng: random.Random, vocab: SplitVocabulary, kind: str, depth: float | None, most_needles=False):
    taken: set[str] = set()
    if kind == "passkey":
        template, question = rng.choice(vocab.passkey_templates)
        value = _draw_value(rng, taken, vocab.value_digits)
        needles, values = [template.format(value=value)], [value]
    else:
        template, question_template = rng.choice(vocab.kv_templates)
        count = 1 if kind == "kv" else (max(MULTI_NEEDLE_COUNT) if most_needles else rng.choice(MULTI_NEEDLE_COUNT))
        names: list[str] = []
        while len(names) < count:
            name = f"{rng.choice(vocab.first_names)} {rng.choice(vocab.last_names)}"
            if name not in names:
                names.append(name)
        values = [_draw_value(rng, taken, vocab.value_digits) for _ in names]
        needles = [template.format(name=name, value=value) for name, value in zip(names, values, strict=True)]
        question = question_template.format(name=names[0])
    depths = [_sample_depth(rng) if depth is None else float(depth)] + [rng.random() for _ in needles[1:]]
    decoy_value = _draw_value(rng, taken, vocab.value_digits)
    decoy = (_decoy_sentence(rng, vocab, decoy_value), decoy_value)
    intros = (vocab.intro, *vocab.extra_intros)
    intro = max(intros, key=len) if most_needles else (rng.choice(intros) if vocab.extra_intros else vocab.intro)
    return _Draft(needles, depths, question, values[0], kind, tuple(values[1:]), decoy, vocab, taken, intro)


def _slots(rng: random.Random, vocab: SplitVocabulary) -> dict[str, str]:
    noun, noun2 = rng.sample(vocab.nouns, 2)
    return dict(
        adj=rng.choice(vocab.adjectives),
        noun=noun,
        noun2=noun2,
        verb=rng.choice(vocab.verbs),
        place=rng.choice(vocab.places),
    )


def _decoy_sentence(rng: random.Random, vocab: SplitVocabulary, value: str) -> str:
    return rng.choice(vocab.decoy_templates).format(number=value, **_slots(rng, vocab))


@functools.cache
def corpus_sentences(split: str) -> tuple[str, ...]:
    """Sentences of the offline corpus's part for ``split`` (``train`` -> train topics and docstrings, ``eval`` ->
    held-out topics, less any sentence that training text also has), whitespace-normalised, without long numbers (a
    needle-shaped number in the filler would be an unrecorded wrong answer)."""
    from mla_components.data._corpus import corpus_texts

    text = " ".join(corpus_texts("train" if split == "train" else "heldout"))
    sentences = re.split(r"(?<=[.!?:])\s+", " ".join(text.split()))
    kept = tuple(s for s in sentences if 20 <= len(s) <= 400 and not re.search(r"\d{4,}", s))
    if split == "train":
        return kept
    seen = set(corpus_sentences("train"))  # boilerplate the held-out topics share with training text
    return tuple(s for s in kept if s not in seen)


def _filler_source(rng: random.Random, vocab: SplitVocabulary, haystack: str, split: str) -> Callable[[], str]:
    """A generator of filler sentences for one sample."""
    if haystack == "corpus":
        sentences = corpus_sentences(split)
        start = rng.randrange(len(sentences))
        position = itertools.count(start)
        return lambda: sentences[next(position) % len(sentences)]  # consecutive prose, as a document reads

    def synthetic() -> str:
        return rng.choice(vocab.filler_templates).format(**_slots(rng, vocab))

    if haystack == "repeat":
        cycle = itertools.cycle([synthetic() for _ in range(rng.randint(*REPEATED_SENTENCES))])
        return lambda: next(cycle)
    return synthetic


def _render(draft: _Draft, filler: list[_Filler]) -> NeedleSample:
    """Insert the needles into the filler at their depths (by filler tokens before them) and build the sample."""
    cumulative = [0]
    for piece in filler:
        cumulative.append(cumulative[-1] + piece.num_tokens)
    total = cumulative[-1]
    # Needle i goes before filler piece slots[i]: the boundary whose token offset is nearest depth * total.
    slots = []
    for depth in draft.depths:
        index = bisect.bisect_left(cumulative, depth * total)
        if index > 0 and (
            index == len(cumulative) or depth * total - cumulative[index - 1] < cumulative[index] - depth * total
        ):
            index -= 1
        slots.append(index)
    pieces: list[str] = [draft.intro]
    for position in range(len(filler) + 1):
        pieces += [needle for needle, slot in zip(draft.needles, slots, strict=True) if slot == position]
        if position < len(filler):
            pieces.append(filler[position].text)
    decoys = tuple(piece.decoy_value for piece in filler if piece.decoy_value is not None)
    return NeedleSample(
        context=" ".join(pieces),
        question=draft.question,
        answer=draft.answer,
        depth=draft.depths[0],
        kind=draft.kind,
        distractors=draft.distractors,
        decoys=decoys,
    )


def _measure(tokenizer: Any, draft: _Draft, filler: list[_Filler], answer_in_length: bool) -> int:
    sample = _render(draft, filler)
    if answer_in_length:
        return answer_tokens_length(tokenizer, sample, sample.answer)
    return len(needle_prompt_tokens(tokenizer, sample))


def build_needle_sample(
    tokenizer: Any,
    rng: random.Random,
    *,
    target_tokens: int,
    depth: float | None,
    kind: str,
    split: str,
    answer_in_length: bool,
    haystack: str = "synthetic",
) -> NeedleSample:
    """Draw needles from ``rng`` and fill the haystack up to ``target_tokens`` (arguments already validated).

    Args:
        answer_in_length (bool): size the full training chat (prompt + answer + end tokens) instead of the
            generation prompt, so an SFT/DPO sequence never exceeds ``target_tokens``.
        haystack (str): the filler's source, one of :data:`HAYSTACKS`. Default ``"synthetic"``.
    """
    tokenizer = untruncated(tokenizer)
    draft = _draw_needles(rng, VOCABULARIES[split], kind, depth)
    vocab = draft.vocab

    def piece_tokens(text: str) -> int:
        return len(tokenizer.encode(" " + text, add_bos=False, add_eos=False))

    decoy_text, decoy_value = draft.decoy
    filler = [_Filler(decoy_text, piece_tokens(decoy_text), decoy_value)]
    base = _measure(tokenizer, draft, filler, answer_in_length)
    if base > target_tokens:
        raise ValueError(
            f"context_tokens={target_tokens} is too small for a {kind!r} needle sample: the introduction, needle(s), "
            f"question and chat format alone take {base} tokens of this tokenizer; raise context_tokens"
        )
    budget, used = target_tokens - base, 0
    next_sentence = _filler_source(rng, vocab, haystack, split)
    # Whole sentences while they fit; the mandatory decoy goes at a random place among them.
    while True:
        if haystack != "repeat" and rng.randrange(DECOY_EVERY) == 0:
            value = _draw_value(rng, draft.taken_values, vocab.value_digits)
            piece = _Filler(_decoy_sentence(rng, vocab, value), 0, value)
        else:
            piece = _Filler(next_sentence(), 0)
        piece.num_tokens = piece_tokens(piece.text)
        if used + piece.num_tokens > budget:
            break
        filler.append(piece)
        used += piece.num_tokens
    filler.insert(rng.randrange(len(filler)), filler.pop(0))
    # Close the gap word by word: the next sentence's words while they fit, then each short word at most once.
    tail_words, tail_tokens = [], 0
    sentence_words = [w for w in piece.text.split() if piece.decoy_value is None or piece.decoy_value not in w]
    for word in sentence_words:
        if used + tail_tokens + piece_tokens(word) > budget:
            break
        tail_words.append(word)
        tail_tokens += piece_tokens(word)
    # short words, repeated while one fits: a next word too long for the budget leaves no gap of several tokens
    gap_words = [(word, piece_tokens(word)) for word in sorted(_GAP_WORDS, key=len, reverse=True)]
    while fits := [(word, n) for word, n in gap_words if used + tail_tokens + n <= budget]:
        tail_words.append(fits[0][0])
        tail_tokens += fits[0][1]
    if tail_words:
        filler.append(_Filler(" ".join(tail_words), tail_tokens))
    # Verify once on the real rendering; drop trailing filler if the tokenizer merged across piece boundaries.
    excess = _measure(tokenizer, draft, filler, answer_in_length) - target_tokens
    while excess > 0:
        removable = [i for i, piece in enumerate(filler) if piece.text != decoy_text]
        if not removable:
            raise ValueError(f"context_tokens={target_tokens} is too small for a {kind!r} needle sample")
        while excess > 0 and removable:
            excess -= filler.pop(removable.pop()).num_tokens
        excess = _measure(tokenizer, draft, filler, answer_in_length) - target_tokens
    return _render(draft, filler)
