"""Check a recipe config in seconds, before any weights load: the mistakes that otherwise surface minutes into a
run (or after a queue wait on a cluster) fail here with the field named.

    mla-tune validate --config mla_tiny/sft_distributed dataset.context_tokens=100000

Checks, in order: every ``_component_`` path imports and its arguments bind (Torchtune's ``config.validate``);
the model builds on the meta device (dims that don't fit); the tokenizer loads (its file exists); the dataset
builds and yields its first sample (a needle longer than the context) and its samples fit the model's
``max_seq_len``; the checkpoint directory holds a model or ``init_model`` will create one, and its ``config.json``
describes the config's model (model_type, dimensions). ``mla-tune run`` runs this before ``tune run``.
"""

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.config._errors import ConfigError, InstantiationError
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args

from mla_components._validation import check_selected_names


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


# config.json fields that must agree between a checkpoint and the model it is loaded into
_DIMENSIONS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
_SAMPLE_TOKENS = ("tokens", "chosen_input_ids", "rejected_input_ids")  # SFT, DPO


def _check_sample_length(cfg: DictConfig, sample, max_seq_len: int) -> None:
    """Refuse samples longer than the model's ``max_seq_len`` (positions past it have no RoPE entry)."""
    context = cfg.dataset.get("context_tokens")
    if isinstance(context, int) and context > max_seq_len:
        raise PreflightError(
            f"config field `dataset.context_tokens`: {context} exceeds config field `model.max_seq_len` "
            f"({max_seq_len}); lower dataset.context_tokens or raise model.max_seq_len"
        )
    lengths = [len(sample[k]) for k in _SAMPLE_TOKENS if isinstance(sample, dict) and k in sample]
    if lengths and max(lengths) > max_seq_len:
        raise PreflightError(
            f"config field `dataset`: its first sample is {max(lengths)} tokens, more than config field "
            f"`model.max_seq_len` ({max_seq_len}); shorten the samples (e.g. tokenizer.max_seq_len) or raise "
            "model.max_seq_len"
        )


def _check_checkpoint_model(name: str, path: Path, model) -> None:
    """Refuse a checkpoint whose ``config.json`` (``path``) describes another model than the config's ``model``."""
    from mla_components.checkpointing.init import hf_config_of

    try:
        expected = hf_config_of(model)
    except ValueError:  # a model from elsewhere: nothing to compare with
        return
    try:
        actual = json.loads(path.read_text())
    except ValueError as e:
        raise PreflightError(f"config field `{name}.checkpoint_dir`: {path} is not valid JSON ({e})") from e
    if actual.get("model_type") != expected.get("model_type"):
        raise PreflightError(
            f"config field `{name}.checkpoint_dir`: {path} has model_type {actual.get('model_type')!r}, but config "
            f"field `model` builds a {expected.get('model_type')!r} model; point {name}.checkpoint_dir at a checkpoint "
            "of that model (or correct model_type in that file)"
        )
    wrong = [
        f"{key}={actual[key]!r} (model: {expected[key]!r})"
        for key in _DIMENSIONS
        if key in actual and key in expected and actual[key] != expected[key]
    ]
    if wrong:
        raise PreflightError(
            f"config field `{name}.checkpoint_dir`: {path} describes another model than config field `model`: "
            f"{', '.join(wrong)}; point {name}.checkpoint_dir at a checkpoint of this model or change `model`"
        )


def _components(node, field: str):
    """``(field, node)`` of one component, a list of them, or named entries (``dataset: {corpus: {...}, ...}``)."""
    if isinstance(node, ListConfig):
        return [(f"{field}[{i}]", item) for i, item in enumerate(node)]
    if "_component_" in node:
        return [(field, node)]
    return [(f"{field}.{key}", item) for key, item in node.items()]


def _entry_model(entry, default):
    if entry.get("model") is None:
        return default
    with torch.device("meta"):
        return _check("model", lambda: tt_config.instantiate(entry.model))


def preflight(cfg: DictConfig) -> None:
    """Raise ``PreflightError`` naming the first field that cannot work."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise PreflightError(f"config field `{missing[0]}`: required (`???` in the config); pass {missing[0]}=<value>")
    _check("_component_ paths", lambda: tt_config.validate(cfg))
    model = None
    if "model" in cfg:
        with torch.device("meta"):
            model = _check("model", lambda: tt_config.instantiate(cfg.model))
    tokenizer = _check("tokenizer", lambda: tt_config.instantiate(cfg.tokenizer)) if "tokenizer" in cfg else None
    if "dataset" in cfg and tokenizer is not None:
        for field, node in _components(cfg.dataset, "dataset"):
            dataset = _check(field, lambda node=node: tt_config.instantiate(node, tokenizer))
            sample = _check(field, lambda dataset=dataset: dataset[0])
            if isinstance(getattr(model, "max_seq_len", None), int):
                _check_sample_length(cfg, sample, model.max_seq_len)
    checkpointers = [(n, cfg[n], model) for n in ("checkpointer", "ref_checkpointer") if n in cfg]
    if checkpointers and isinstance(checkpointers[0][1], ListConfig):  # compare mode: [{name, checkpointer, model?}]
        entries = list(enumerate(checkpointers[0][1]))
        selected = cfg.get("model_names")  # a run of some models checks only theirs
        if selected is not None:
            names = [entry.get("name") for _, entry in entries]
            try:
                keep = check_selected_names(selected, names)
            except ValueError as error:
                raise PreflightError(f"config field {error}") from None
            entries = [(i, entry) for i, entry in entries if entry.get("name") in keep]
        checkpointers = [
            (f"checkpointer[{i}].checkpointer", entry.checkpointer, _entry_model(entry, model)) for i, entry in entries
        ]
    for name, node, entry_model in checkpointers:
        directory = Path(node.checkpoint_dir)
        if (directory / "config.json").is_file():
            if entry_model is not None:
                _check_checkpoint_model(name, directory / "config.json", entry_model)
        elif not node.get("init_model"):
            raise PreflightError(
                f"config field `{name}.checkpoint_dir`: {directory} has no config.json; point it at an HF model "
                f"directory, or set {name}.init_model (e.g. mla_tiny) to start from a fresh initialisation"
            )
