"""Check a recipe config in seconds, before any weights load: the mistakes that otherwise surface minutes into a
run (or after a queue wait on a cluster) fail here with the field named.

    mla-tune validate --config mla_tiny/sft_distributed dataset.context_tokens=100000

Checks, in order: every ``_component_`` path imports and its arguments bind (Torchtune's ``config.validate``);
the model builds on the meta device (dims that don't fit); the tokenizer loads (its file exists); the dataset
builds and yields its first sample (a needle longer than the context); the checkpoint directory holds a model
or ``init_model`` will create one. ``mla-tune run`` runs this before ``tune run``.
"""

from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config as tt_config
from torchtune.config._errors import ConfigError, InstantiationError
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args


class PreflightError(ValueError):
    """A config value that cannot work; the message names the config field."""


def load_config(config_path: str | Path, overrides: list[str]) -> DictConfig:
    """The config exactly as ``tune run`` would see it (YAML + ``key=value`` overrides)."""
    parser = TuneRecipeArgumentParser()
    yaml_args, cli_args = parser.parse_known_args(["--config", str(config_path), *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


def _check(field: str, build):
    try:
        return build()
    except (ConfigError, InstantiationError, ValueError, TypeError, OSError, ImportError) as e:
        raise PreflightError(f"config field `{field}`: {e}") from e


def preflight(cfg: DictConfig) -> None:
    """Raise ``PreflightError`` naming the first field that cannot work."""
    _check("_component_ paths", lambda: tt_config.validate(cfg))
    if "model" in cfg:
        with torch.device("meta"):
            _check("model", lambda: tt_config.instantiate(cfg.model))
    tokenizer = _check("tokenizer", lambda: tt_config.instantiate(cfg.tokenizer)) if "tokenizer" in cfg else None
    if "dataset" in cfg and tokenizer is not None:
        dataset = _check("dataset", lambda: tt_config.instantiate(cfg.dataset, tokenizer))
        _check("dataset", lambda: dataset[0])
    for name in ("checkpointer", "ref_checkpointer"):
        if name in cfg:
            directory = Path(cfg[name].checkpoint_dir)
            if not (directory / "config.json").is_file() and not cfg[name].get("init_model"):
                raise PreflightError(
                    f"config field `{name}.checkpoint_dir`: {directory} has no config.json; point it at an HF model "
                    f"directory, or set {name}.init_model (e.g. mla_tiny) to start from a fresh initialisation"
                )
