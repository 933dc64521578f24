"""``mla-tune convert`` is ``mla-tune run convert_to_mla`` (validated, then ``tune run`` with the files resolved)."""

import pytest

from mla_components import cli


class Exec(Exception):
    pass


def test_convert_runs_the_conversion_recipe_with_the_project_config(monkeypatch):
    def execve(path, argv, env):
        raise Exec(argv)

    monkeypatch.setattr(cli.os, "execve", execve)
    with pytest.raises(Exec) as done:
        cli.main(["convert", "--config", "smollm2_135m/convert_mla_256", "kv_lora_rank=128"])
    argv = done.value.args[0]
    assert argv[1:3] == ["run", "mla_recipes/convert_to_mla.py"]
    assert argv[4].endswith("configs/smollm2_135m/convert_mla_256.yaml") and argv[5] == "kv_lora_rank=128"


def test_convert_without_a_config_names_the_flag():
    with pytest.raises(SystemExit, match="mla-tune convert: --config"):
        cli.main(["convert"])


def test_validate_names_a_required_field_left_unset(capsys):
    with pytest.raises(SystemExit, match="config field `origin.source`: required"):
        cli.main(["validate", "--config", "llama3_2_1b/convert_mla_512"])
