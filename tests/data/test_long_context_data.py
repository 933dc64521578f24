"""The variety the long-context training data draws from: mixed lengths, three haystack sources, chat and plain
prompts, many phrasings; and that none of it leaks the evaluation split's words or templates."""

import re

import pytest
import torch
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


def test_position_range_skips_ahead_once_and_the_collate_keeps_the_positions(byte_tok):
    """PoSE-style positions: each sample's ``input_pos`` is increasing, jumps once, spans up to ``position_range``;
    ``padded_collate_positions`` pads them (continuing) and fills ``0..len-1`` for samples without their own."""
    from mla_components.data import corpus_dataset, padded_collate_positions

    ds = _dataset(byte_tok, position_range=20_000)
    spans = []
    for index in range(len(ds)):
        item = ds[index]
        positions = item["input_pos"]
        steps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
        assert len(positions) == len(item["tokens"]) and positions[0] == 0 and positions[-1] < 20_000
        assert all(step >= 1 for step in steps) and sum(step > 1 for step in steps) <= 1
        spans.append(positions[-1])
    assert max(spans) > 10_000  # the skips reach far past the 1,200-token samples
    assert ds[3]["input_pos"] == ds[3]["input_pos"]  # a pure function of the index

    window = corpus_dataset(byte_tok, seq_len=300)[0]
    batch = padded_collate_positions([ds[0], window], padding_idx=0, ignore_idx=-100)
    width = batch["tokens"].shape[1]
    assert batch["input_pos"].shape == (2, width)
    assert batch["input_pos"][0, : len(ds[0]["tokens"])].tolist() == ds[0]["input_pos"]
    assert batch["input_pos"][1].tolist() == list(range(width))
    assert torch.equal(batch["labels"][1, 300:], torch.full((width - 300,), -100))

    with pytest.raises(ValueError, match="position_range must be an int >= the longest context_tokens"):
        _dataset(byte_tok, position_range=1000)
    with pytest.raises(ValueError, match="position_range needs packed=False"):
        needle_sft_dataset(byte_tok, num_samples=2, context_tokens=700, packed=True, position_range=5000)


def test_positions_reach_the_model_in_the_sft_recipes_loss_step():
    """Torchtune's SFT recipe calls ``model(**batch)`` minus ``labels``: with ``input_pos`` from the collate, an MLA
    model's RoPE sees the skipped positions (the logits differ from the default positions)."""
    from mla_components.models import mla_tiny

    torch.manual_seed(0)
    model = mla_tiny(max_seq_len=4096).eval()
    tokens = torch.randint(0, 256, (1, 64))
    skipped = torch.tensor([list(range(32)) + list(range(3000, 3032))])
    batch = {"tokens": tokens, "input_pos": skipped}
    with torch.no_grad():
        shifted, plain = model(**batch), model(tokens)
    assert not torch.allclose(shifted[:, 40:], plain[:, 40:])
    torch.testing.assert_close(shifted[:, :32], plain[:, :32])  # causal: the first part is unchanged
