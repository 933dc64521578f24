"""The variety the long-context training data draws from: mixed lengths, three haystack sources, chat and plain
prompts, many phrasings; and that none of it leaks the evaluation split's words or templates."""

import re

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from mla_components.data import needle_dpo_dataset, needle_sft_dataset
from mla_components.data._haystack import HAYSTACKS, corpus_sentences
from mla_components.data._word_lists import EVAL, TRAIN
from mla_components.evaluation import landmark


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def _dataset(tok, **overrides):
    kwargs = dict(
        num_samples=24,
        context_tokens=[700, 1200],
        needle_kinds=["passkey", "kv", "multi"],
        haystacks=list(HAYSTACKS),
        prompt_formats=["chat", "plain"],
        seed=3,
    )
    return needle_sft_dataset(tok, **(kwargs | overrides))


def test_training_phrasings_avoid_the_evaluation_vocabulary_and_the_standard_prompt():
    texts = [t for pair in TRAIN.passkey_templates + TRAIN.kv_templates for t in pair]
    texts += [*TRAIN.extra_intros, *TRAIN.answer_cues]
    for text in texts:
        assert not _words(text) & EVAL.content_words(), text
    standard = {landmark.INTRO, landmark.FILLER, landmark.NEEDLE, landmark.QUESTION}
    assert not standard & set(texts)
    assert not set(TRAIN.answer_cues) & set(EVAL.answer_cues)
    assert len(TRAIN.passkey_templates) >= 10 and len(TRAIN.kv_templates) >= 8


def test_mixed_lengths_haystacks_and_formats(byte_tok):
    ds = _dataset(byte_tok)
    seen = {"lengths": set(), "haystacks": set(), "formats": set()}
    for index in range(len(ds)):
        length, haystack, prompt_format, cue = ds._variant(index)
        seen["lengths"].add(length)
        seen["haystacks"].add(haystack)
        seen["formats"].add(prompt_format)
        item = ds[index]
        assert len(item["tokens"]) <= length and len(item["tokens"]) >= length - 40
        supervised = [t for t in item["labels"] if t != CROSS_ENTROPY_IGNORE_IDX]
        answer = ds.needle_sample(index).answer
        assert answer in byte_tok.decode(supervised)
        if prompt_format == "plain":
            text = byte_tok.decode(item["tokens"])
            assert not text.startswith("<|")  # no chat template
            # the prompt ends with the cue; only the value and the end token are supervised
            assert byte_tok.decode(supervised).strip() == answer
            assert item["tokens"][-1] == byte_tok.eos_id
            assert text.rstrip().endswith(f"{cue} {answer}")
    assert seen == {"lengths": {700, 1200}, "haystacks": set(HAYSTACKS), "formats": {"chat", "plain"}}


def test_corpus_haystack_is_consecutive_prose_of_the_split(byte_tok):
    ds = _dataset(byte_tok, haystacks=["corpus"], prompt_formats=["chat"], context_tokens=[1500])
    sentences = set(corpus_sentences("train"))
    sample = ds.needle_sample(0)
    found = [s for s in sentences if s in sample.context]
    assert len(found) >= 3
    assert not set(corpus_sentences("eval")) & sentences  # held-out topics are never training filler


def test_repeat_haystack_cycles_a_few_sentences(byte_tok):
    ds = _dataset(byte_tok, haystacks=["repeat"], needle_kinds=["passkey"], context_tokens=[1500])
    context = ds.needle_sample(0).context
    sentences = re.findall(r"[A-Z][^.]*\.", context)
    counts = {s: sentences.count(s) for s in set(sentences)}
    assert max(counts.values()) >= 5  # the same sentence again and again, as in repeated-filler prompts


def test_dpo_pairs_share_the_prompt_in_either_format(byte_tok):
    ds = needle_dpo_dataset(
        byte_tok,
        num_samples=12,
        context_tokens=[800],
        needle_kinds=["multi"],
        rejection_kinds=["distractor"],
        haystacks=["synthetic", "repeat"],
        prompt_formats=["chat", "plain"],
    )
    formats = set()
    for index in range(len(ds)):
        formats.add(ds._variant(index)[2])
        item = ds[index]
        chosen, rejected = item["chosen_input_ids"], item["rejected_input_ids"]
        prefix = [
            c for c, label in zip(chosen, item["chosen_labels"], strict=True) if label == CROSS_ENTROPY_IGNORE_IDX
        ]
        assert rejected[: len(prefix)] == chosen[: len(prefix)]
        sample, wrong, _ = ds.preference(index)
        assert wrong in sample.distractors
        assert wrong in byte_tok.decode([t for t in item["rejected_labels"] if t != CROSS_ENTROPY_IGNORE_IDX])
    assert formats == {"chat", "plain"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(haystacks=["wikipedia"]), "haystacks must be a non-empty subset of"),
        (dict(haystacks=[]), "haystacks must be a non-empty subset of"),
        (dict(prompt_formats=["landmark"]), "prompt_formats must be a non-empty subset of"),
        (dict(context_tokens=[]), "context_tokens must be a positive int or a non-empty list"),
        (dict(context_tokens=[700, 0]), "context_tokens must be a positive int"),
        (dict(context_tokens=[100, 700]), "context_tokens=100 is too small"),
    ],
)
def test_bad_variety_arguments_name_the_field(byte_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dataset(byte_tok, **kwargs)
