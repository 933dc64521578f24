"""``mla_components._validation``: the shared field checks, with the error naming the field and the fix."""

import pytest
from omegaconf import OmegaConf

from mla_components._validation import check_selected_names

NAMES = ["mla_sft", "mla_dpo"]


def test_selected_names_from_a_list_or_a_listconfig():
    assert check_selected_names(["mla_dpo"], NAMES) == {"mla_dpo"}
    assert check_selected_names(OmegaConf.create(["mla_sft", "mla_dpo"]), NAMES) == {"mla_sft", "mla_dpo"}


@pytest.mark.parametrize(
    "selected, names, message",
    [
        ("mla_dpo", NAMES, "`model_names`: a list of names, e.g. model_names=[mla_sft]"),
        (OmegaConf.create({"mla_dpo": 1}), NAMES, "`model_names`: a list of names"),  # a mapping's keys are no list
        ([1], NAMES, "`model_names`: a list of names"),
        (5, [], "`model_names`: a list of names, e.g. model_names=[NAME]"),
        ([], NAMES, "`model_names` is empty; choose from the config's models ['mla_sft', 'mla_dpo']"),
        (["mla_rl", "mla_dpo"], NAMES, "`model_names`: ['mla_rl'] not among the config's models"),
    ],
)
def test_selected_names_refused_with_the_field_and_the_choices(selected, names, message):
    with pytest.raises(ValueError) as error:
        check_selected_names(selected, names)
    assert message in str(error.value)
