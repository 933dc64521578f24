"""Every shipped config names a recipe that exists and binds to the signatures of the components it names;
``mla-tune ls/cp/run`` find them; bad values are refused before any training starts."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune._recipe_registry import get_all_recipes
from torchtune.config import validate
from torchtune.config._utils import _get_component_from_path

from mla_components.cli import main as mla_tune
from mla_components.cli import project_configs, resolve_recipe, tune_run_argv
from mla_components.models import mla_tiny
from tests.training._tune import ENV, REPO, TUNE

CONFIGS = project_configs()
BUILTIN_RECIPES = {r.name for r in get_all_recipes()}


def _nested_components(node, path=""):
    """Components inside lists/dicts (e.g. MultiLogger's loggers), which Torchtune's validate does not visit."""
    if isinstance(node, DictConfig):
        if "_component_" in node and path.count(".") > 0:
            yield path, node
        for key, value in node.items_ex(resolve=False):  # a `???` (required) value stays unread
            yield from _nested_components(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            yield from _nested_components(value, f"{path}[{i}]")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_names_an_existing_recipe_and_binds_to_its_components(name):
    recipe, path = CONFIGS[name]
    custom = recipe.startswith("mla_recipes/") and resolve_recipe(recipe) == recipe  # the file exists
    assert recipe in BUILTIN_RECIPES or custom, f"{name}: unknown recipe {recipe}"
    cfg = OmegaConf.load(path)
    validate(cfg)
    for where, node in _nested_components(cfg):
        component = _get_component_from_path(node["_component_"])
        kwargs = {k: v for k, v in node.items() if k != "_component_"}
        try:
            inspect.signature(component).bind_partial(**kwargs)
        except TypeError as e:
            raise AssertionError(f"{name}: {where}: {e}") from e


def test_mla_tune_ls_and_cp(tmp_path, capsys):
    mla_tune(["ls"])
    listing = capsys.readouterr().out
    for name, (recipe, _) in CONFIGS.items():
        assert name in listing and recipe in listing
    mla_tune(["cp", "mla_tiny/sft_distributed", str(tmp_path)])
    assert (tmp_path / "sft_distributed.yaml").read_text() == CONFIGS["mla_tiny/sft_distributed"][1].read_text()
    with pytest.raises(SystemExit, match="exists"):
        mla_tune(["cp", "mla_tiny/sft_distributed", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file or project config"):
        mla_tune(["cp", "mla_tiny/nope", str(tmp_path)])


def _run_bad(*overrides: str) -> str:
    """A single-device SFT with one bad value; returns its output. It must fail within the set-up (well before
    a training step, which would log ``loss``)."""
    command = [
        TUNE,
        "run",
        "full_finetune_single_device",
        "--config",
        "configs/mla_tiny/sft_single_device.yaml",
        "metric_logger._component_=torchtune.training.metric_logging.StdoutLogger",
        *overrides,
    ]
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "loss:" not in proc.stdout
    return proc.stdout + proc.stderr


def test_bad_values_fail_before_training_naming_the_field(tmp_path):
    out = _run_bad(
        f"output_dir={tmp_path / 'a'}",
        f"checkpointer.checkpoint_dir={tmp_path / 'missing'}",
        "~checkpointer.init_model",
    )
    assert f"checkpoint_dir {tmp_path / 'missing'} has no config.json" in out
    out = _run_bad(
        f"output_dir={tmp_path / 'b'}", f"checkpointer.checkpoint_dir={tmp_path / 'init'}", "model.kernel_backend=fast"
    )
    assert "kernel_backend must be one of" in out


def test_mla_tune_run_resolves_project_config_names():
    argv = tune_run_argv(
        ["--nproc_per_node", "2", "full_finetune_distributed", "--config", "mla_tiny/sft_distributed", "epochs=1"]
    )
    assert argv == [
        "run",
        "--nproc_per_node",
        "2",
        "full_finetune_distributed",
        "--config",
        str(CONFIGS["mla_tiny/sft_distributed"][1]),
        "epochs=1",
    ]
    with pytest.raises(SystemExit, match="--config"):
        tune_run_argv(["full_finetune_distributed", "--config", "nope/nope"])


@pytest.mark.parametrize(
    "config, override, field, detail",
    [
        (
            "mla_tiny/sft_distributed",
            "model._component_=mla_components.models.mla_huge",
            "_component_ paths",
            "mla_huge",
        ),
        ("mla_tiny/sft_distributed", "model.qk_rope_head_dim=63", "model", "qk_rope_head_dim"),
        ("mla_tiny/sft_distributed", "dataset.context_tokens=100", "dataset", "set context_tokens >= "),
        ("mla_1b/sft_distributed", "tokenizer.path=/nonexistent/tokenizer.model", "tokenizer", "/nonexistent"),
        ("mla_tiny/passkey_eval", "model.kv_cache_dtype=fp8", "model", "kv_cache_dtype must be one of"),
    ],
    ids=[
        "unknown_component",
        "dims_that_do_not_fit",
        "needle_longer_than_context",
        "missing_tokenizer_file",
        "unknown_cache_dtype",
    ],
)
def test_mla_tune_validate_names_the_field(config, override, field, detail):
    """``mla-tune validate`` (also run by ``mla-tune run`` before ``tune run``) refuses each kind of bad config in
    seconds, naming the config field and what is wrong with it."""
    with pytest.raises(SystemExit) as failure:
        mla_tune(["validate", "--config", config, override])
    message = str(failure.value)
    assert f"config field `{field}`" in message and detail in message, message


def test_mla_tune_validate_accepts_the_shipped_configs(capsys):
    mla_tune(
        [
            "validate",
            "--config",
            "mla_tiny/sft_distributed",
            "dataset.context_tokens=4096",
            "tokenizer.max_seq_len=4096",
        ]
    )
    assert "config OK" in capsys.readouterr().out


def _mla_tiny_config_json(directory: Path, **changes) -> Path:
    """``directory/config.json`` of mla_tiny with ``changes`` (all that preflight reads of a checkpoint)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**mla_tiny().mla_config.to_hf_config(), **changes}))
    return directory / "config.json"


@pytest.mark.parametrize(
    "changes, detail",
    [
        ({"model_type": "llama"}, "has model_type 'llama', but config field `model` builds a 'deepseek_v3' model"),
        ({"hidden_size": 512}, "describes another model than config field `model`: hidden_size=512 (model: 256)"),
    ],
    ids=["model_type", "dimensions"],
)
def test_mla_tune_validate_compares_the_checkpoint_config_json_with_the_model(tmp_path, changes, detail):
    config_json = _mla_tiny_config_json(tmp_path / "ckpt", **changes)
    with pytest.raises(SystemExit) as failure:
        mla_tune(
            ["validate", "--config", "mla_tiny/sft_distributed", f"checkpointer.checkpoint_dir={tmp_path / 'ckpt'}"]
        )
    message = str(failure.value)
    assert "config field `checkpointer.checkpoint_dir`" in message and str(config_json) in message, message
    assert detail in message, message
    assert str(CONFIGS["mla_tiny/sft_distributed"][1]) in message  # the config file


def test_mla_tune_validate_checks_only_the_compare_entries_that_model_names_selects(tmp_path, capsys):
    """Compare mode with ``model_names``: the unselected entries' checkpoints need not exist; a selected one's must;
    a name the config lacks, an empty list or a bare string is refused."""
    cfg = OmegaConf.load(CONFIGS["mla_tiny/passkey_eval_compare"][1])
    cfg.checkpointer[0].checkpointer.checkpoint_dir = str(tmp_path / "absent")
    cfg.checkpointer[1].checkpointer.checkpoint_dir = str(tmp_path / "dpo")
    _mla_tiny_config_json(tmp_path / "dpo")
    config = tmp_path / "compare.yaml"
    OmegaConf.save(cfg, config)
    mla_tune(["validate", "--config", str(config), "model_names=[mla_tiny_dpo]"])
    assert "config OK" in capsys.readouterr().out
    for overrides, detail in [
        ([], f"`checkpointer[0].checkpointer.checkpoint_dir`: {tmp_path / 'absent'} has no config.json"),
        (["model_names=[mla_tiny_sft]"], f"`checkpointer[0].checkpointer.checkpoint_dir`: {tmp_path / 'absent'} has"),
        (["model_names=[mla_tiny_dpo,mla_tiny_rl]"], "`model_names`: ['mla_tiny_rl'] not among the config's models"),
        (["model_names=[]"], "`model_names` is empty; choose from the config's models"),
        (["model_names=mla_tiny_dpo"], "`model_names`: a list of names, e.g. model_names=[mla_tiny_sft]"),
    ]:
        with pytest.raises(SystemExit) as failure:
            mla_tune(["validate", "--config", str(config), *overrides])
        assert detail in str(failure.value), (overrides, str(failure.value))


def test_mla_tune_validate_checks_sample_lengths_against_the_model_max_seq_len():
    with pytest.raises(SystemExit) as failure:
        mla_tune(
            ["validate", "--config", "mla_tiny/sft_distributed", "model.max_seq_len=256", "dataset.context_tokens=400"]
        )
    message = str(failure.value)
    assert "config field `dataset.context_tokens`: 400 exceeds config field `model.max_seq_len` (256)" in message


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nseed: 0\nbatch_size: 8: 9\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.cli", "validate", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("mla-tune:")]
    assert ours == [
        f"mla-tune: {bad}, line 3, column 14: YAML syntax error: mapping values are not allowed in this context"
    ]


def test_a_second_run_on_a_live_output_dir_is_refused(tmp_path):
    """``tune run`` into the output_dir of a live run (here: a process holding it as a run does) stops before
    touching it, naming the process and the lock file."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mla_components.checkpointing._lock import lock_output_dir; "
         "lock_output_dir(sys.argv[1]); print('holding', flush=True); time.sleep(600)", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        out = _run_bad(
            f"output_dir={tmp_path / 'run'}",
            f"checkpointer.checkpoint_dir={tmp_path / 'init'}",
            "resume_from_checkpoint=True",
        )
    finally:
        holder.kill()
        holder.wait()
    assert f"output_dir {tmp_path / 'run'} is in use by pid {holder.pid}" in out, out[-3000:]
