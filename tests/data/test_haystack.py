"""Haystack generator: token-exact sizing for two tokenizers, depth, needles, determinism, split disjointness."""

import random
import re
import time

import pytest
from torchtune.data import Message

from mla_components.data import NEEDLE_KINDS, make_needle_sample, needle_prompt_tokens
from mla_components.data._haystack import EDGE_DEPTH_SHARE, EDGE_DEPTH_SPAN, _sample_depth
from mla_components.data._word_lists import EVAL, TRAIN

# Sizing is exact for byte-level and regex-pretokenised BPE; allow the documented "a few tokens below".
SLACK = 3
LANDMARK_PASSKEY = "The pass key is {v}. Remember it. {v} is the pass key."


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("tokenizer_name", ["byte_tok", "llama3_tok"])
@pytest.mark.parametrize("kind", NEEDLE_KINDS)
@pytest.mark.parametrize("context_tokens", [700, 3000])
def test_prompt_length_is_target_or_slightly_below(request, tokenizer_name, kind, context_tokens):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for seed in range(3):
        sample = make_needle_sample(tokenizer, context_tokens=context_tokens, depth=None, kind=kind, seed=seed)
        length = len(needle_prompt_tokens(tokenizer, sample))
        assert context_tokens - SLACK <= length <= context_tokens, (seed, length)


@pytest.mark.parametrize("tokenizer_name", ["byte_tok", "llama3_tok"])
def test_128k_tokens_fast_and_exact(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    start = time.perf_counter()
    sample = make_needle_sample(tokenizer, context_tokens=131_072, depth=0.25, kind="multi", seed=0)
    elapsed = time.perf_counter() - start
    assert 131_072 - SLACK <= len(needle_prompt_tokens(tokenizer, sample)) <= 131_072
    assert elapsed < 10, f"128k-token sample took {elapsed:.1f} s: the generator re-encodes too much"


def test_prompt_ends_where_the_answer_starts(byte_tok, llama3_tok):
    sample = make_needle_sample(byte_tok, context_tokens=500, depth=0.5, seed=0)
    tokens = needle_prompt_tokens(byte_tok, sample)
    header = [byte_tok.start_header_id, *b"assistant", byte_tok.end_header_id, *b"\n\n"]
    assert tokens[0] == byte_tok.bos_id and tokens[-len(header) :] == header
    assert byte_tok.decode(tokens).endswith(f"{sample.question}assistant\n\n")
    llama_tokens = needle_prompt_tokens(llama3_tok, sample)
    llama_header = llama3_tok._tokenize_header(Message(role="assistant", content=""))
    assert llama_header[0] == llama3_tok.start_header_id
    assert llama_tokens[0] == llama3_tok.bos_id and llama_tokens[-len(llama_header) :] == llama_header


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_needle_sits_at_the_requested_depth(byte_tok, depth):
    sample = make_needle_sample(byte_tok, context_tokens=4000, depth=depth, seed=1)
    assert sample.depth == depth
    intro_end = len(EVAL.intro) + 1
    needle_start = sample.context.index(LANDMARK_PASSKEY.format(v=sample.answer))
    needle_end = needle_start + len(LANDMARK_PASSKEY.format(v=sample.answer))
    filler_before = needle_start - intro_end
    filler_total = len(sample.context) - intro_end - (needle_end - needle_start)
    # Byte tokenizer: characters are tokens. One filler sentence (< 70 chars) is the placement granularity.
    assert abs(filler_before - depth * filler_total) <= 70
    if depth == 0.0:
        assert needle_start == intro_end
    if depth == 1.0:
        assert needle_end == len(sample.context)


def test_sampled_depth_varies_and_is_reported(byte_tok):
    depths = {make_needle_sample(byte_tok, context_tokens=400, depth=None, seed=s).depth for s in range(8)}
    assert len(depths) == 8 and all(0 <= d <= 1 for d in depths)


def test_sampled_depths_favour_both_ends():
    """30% of sampled depths lie in the first or last 3% (15% each, plus the uniform draws that land there): the
    needle right after the instructions or right before the question, where long-context retrieval fails first."""
    rng = random.Random(0)
    depths = [_sample_depth(rng) for _ in range(4000)]
    head = sum(d <= EDGE_DEPTH_SPAN for d in depths) / len(depths)
    tail = sum(d >= 1 - EDGE_DEPTH_SPAN for d in depths) / len(depths)
    expected = EDGE_DEPTH_SHARE / 2 + (1 - EDGE_DEPTH_SHARE) * EDGE_DEPTH_SPAN  # 0.171
    assert abs(head - expected) < 0.02 and abs(tail - expected) < 0.02, (head, tail)
    middle = [d for d in depths if EDGE_DEPTH_SPAN < d < 1 - EDGE_DEPTH_SPAN]
    assert abs(sum(middle) / len(middle) - 0.5) < 0.02  # uniform in between


def test_passkey_needle_is_landmark_and_unique(byte_tok):
    sample = make_needle_sample(byte_tok, context_tokens=2000, depth=0.4, kind="passkey", seed=3)
    assert re.fullmatch(r"[1-9]\d{4}", sample.answer)
    assert sample.question == "What is the pass key?"
    assert sample.context.count(LANDMARK_PASSKEY.format(v=sample.answer)) == 1
    assert sample.context.count(sample.answer) == 2  # only in the needle sentence
    assert sample.context.startswith(EVAL.intro) and sample.distractors == ()


@pytest.mark.parametrize("kind", ["kv", "multi"])
def test_key_value_needles_and_distractors(byte_tok, kind):
    for seed in range(4):
        sample = make_needle_sample(byte_tok, context_tokens=1500, depth=0.5, kind=kind, seed=seed)
        name = re.fullmatch(r"What is the secret code of (.+)\?", sample.question).group(1)
        assert f"The secret code of {name} is {sample.answer}." in sample.context
        assert sample.context.count(sample.answer) == 1
        if kind == "kv":
            assert sample.distractors == ()
            continue
        assert 2 <= len(sample.distractors) <= 3 and sample.answer not in sample.distractors
        for value in sample.distractors:
            other = re.search(rf"The secret code of ([A-Za-z ]+) is {value}\.", sample.context)
            assert other and other.group(1) != name


def test_decoys_are_needle_shaped_values_in_the_filler(byte_tok):
    for kind in NEEDLE_KINDS:
        sample = make_needle_sample(byte_tok, context_tokens=3000, depth=0.5, kind=kind, seed=7)
        assert len(sample.decoys) >= 1 and len(set(sample.decoys)) == len(sample.decoys)
        values = set(re.findall(r"\b\d{5}\b", sample.context))
        assert values == {sample.answer, *sample.distractors, *sample.decoys}
        assert sample.answer not in sample.decoys and not set(sample.distractors) & set(sample.decoys)


def test_deterministic_from_seed(byte_tok):
    def draw(**overrides):
        kwargs = dict(context_tokens=800, depth=None, kind="multi", seed=11, split="train") | overrides
        return make_needle_sample(byte_tok, **kwargs)

    assert draw() == draw()
    assert draw().context != draw(seed=12).context
    assert draw().context != draw(split="eval").context


def test_train_and_eval_are_disjoint():
    assert not TRAIN.content_words() & EVAL.content_words()
    assert not set(TRAIN.filler_templates + TRAIN.decoy_templates) & set(EVAL.filler_templates + EVAL.decoy_templates)
    for train_pool, eval_pool in (
        (TRAIN.passkey_templates, EVAL.passkey_templates),
        (TRAIN.kv_templates, EVAL.kv_templates),
    ):
        assert not {t for pair in train_pool for t in pair} & {t for pair in eval_pool for t in pair}
    assert TRAIN.intro != EVAL.intro


def test_generated_train_and_eval_text_share_no_content_word(byte_tok):
    for kind in NEEDLE_KINDS:
        for seed in range(3):
            train = make_needle_sample(byte_tok, context_tokens=3000, depth=None, kind=kind, seed=seed, split="train")
            evaluation = make_needle_sample(
                byte_tok, context_tokens=3000, depth=None, kind=kind, seed=seed, split="eval"
            )
            assert not words(train.prompt) & EVAL.content_words()
            assert not words(evaluation.prompt) & TRAIN.content_words()
            # Same seed, different split: independent random streams, not the same draw in other words.
            assert train.answer != evaluation.answer


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(context_tokens=100), "context_tokens=100 is too small"),
        (dict(context_tokens=0), "context_tokens must be a positive int"),
        (dict(context_tokens=512.0), "context_tokens must be a positive int"),
        (dict(depth=1.5), "depth must be a float in \\[0, 1\\]"),
        (dict(kind="haystack"), "needle_kinds must be"),
        (dict(split="test"), "split must be one of"),
    ],
)
def test_bad_arguments_name_the_field(byte_tok, kwargs, field):
    args = dict(context_tokens=1000, depth=0.5, kind="passkey", seed=0, split="eval") | kwargs
    with pytest.raises(ValueError, match=field):
        make_needle_sample(byte_tok, **args)


def test_rejects_a_non_model_tokenizer():
    with pytest.raises(ValueError, match="tokenizer must be a Torchtune ModelTokenizer"):
        make_needle_sample(object(), context_tokens=1000, depth=0.5, seed=0)


def test_train_values_vary_in_length_and_eval_values_keep_the_landmark_five_digits(byte_tok):
    """Training on 4-7 digit values (answers, distractors, decoys), so a model cannot learn to emit five digits
    whatever it read; the eval split keeps the standard five."""
    assert TRAIN.value_digits == (4, 7) and EVAL.value_digits == (5, 5)
    lengths = set()
    for seed in range(12):
        sample = make_needle_sample(byte_tok, context_tokens=1500, depth=None, kind="multi", seed=seed, split="train")
        values = (sample.answer, *sample.distractors, *sample.decoys)
        assert all(4 <= len(v) <= 7 and v[0] != "0" for v in values)
        lengths |= {len(v) for v in values}
        held_out = make_needle_sample(byte_tok, context_tokens=1500, depth=None, kind="multi", seed=seed, split="eval")
        assert all(len(v) == 5 for v in (held_out.answer, *held_out.distractors, *held_out.decoys))
    assert lengths == {4, 5, 6, 7}
