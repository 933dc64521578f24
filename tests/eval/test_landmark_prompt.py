"""The standard Landmark-Attention passkey prompt (``prompt_format: landmark``): evaluation-only, plain text."""

import pytest

from mla_components.data import byte_tokenizer
from mla_components.evaluation.landmark import FILLER, INTRO, QUESTION, landmark_sample
from mla_components.evaluation.passkey import PasskeyGrid, make_trials


@pytest.mark.parametrize("length", [400, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_fits_the_length_and_places_the_needle_at_its_depth(length, depth):
    tokenizer = byte_tokenizer()
    ids, sample = landmark_sample(tokenizer, context_tokens=length, depth=depth, seed=7)
    text = tokenizer.decode(ids)
    assert len(ids) <= length and text.startswith(INTRO) and text.endswith("\n" + QUESTION)
    assert text.count(sample.answer) == 2 and len(sample.answer) == 5
    before, after = text.split(f"The pass key is {sample.answer}.")
    fillers_before, fillers_after = before.count(FILLER), after.count(FILLER)
    assert fillers_before + fillers_after >= 1
    assert abs(fillers_before / (fillers_before + fillers_after) - depth) <= 0.5 / (fillers_before + fillers_after)
    if length >= 1000:  # long enough to be filled to within one filler sentence (~90 byte tokens)
        assert len(ids) > length - 2 * len(FILLER)


def test_grid_uses_it_and_refuses_what_it_cannot_ask():
    grid = PasskeyGrid(context_lengths=(512,), depths=(0.5,), trials_per_cell=2, prompt_format="landmark")
    trials = make_trials(byte_tokenizer(), grid)
    assert len(trials) == 2 and trials[0].sample.answer != trials[1].sample.answer
    assert byte_tokenizer().decode(trials[0].prompt).endswith(QUESTION)
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        PasskeyGrid(context_lengths=(512,), depths=(0.5,), trials_per_cell=1, prompt_format="qa")
    with pytest.raises(ValueError, match="needle_kind must be passkey"):
        PasskeyGrid(
            context_lengths=(512,), depths=(0.5,), trials_per_cell=1, prompt_format="landmark", needle_kind="kv"
        )


def test_a_length_too_short_for_the_prompt_is_refused_by_name():
    with pytest.raises(ValueError, match="context_lengths: 256 tokens cannot hold the landmark prompt"):
        landmark_sample(byte_tokenizer(), context_tokens=256, depth=0.5, seed=0)
