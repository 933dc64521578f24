"""Checks of config fields shared by every layer (modules, model configs, conversion, evaluation): one wording per
rule, each error naming the field. Imports nothing of the project, so anything may use it."""

from collections.abc import Sequence
from typing import Any


def is_positive_int(value: Any) -> bool:
    """An ``int`` (not a ``bool``: YAML's ``true`` is no size) >= 1."""
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless :func:`is_positive_int`."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_ints(**fields: Any) -> None:
    """:func:`check_positive_int` for each ``name=value``, in order."""
    for name, value in fields.items():
        check_positive_int(name, value)


def check_rope_dim(value: Any, name: str = "qk_rope_head_dim") -> None:
    """A rotary dim: a positive integer, and even, because RoPE rotates pairs of values."""
    check_positive_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (RoPE rotates pairs), got {value}")


def check_selected_names(selected: Any, names: list[str], field: str = "model_names") -> set[str]:
    """The entries a run selects by name from a config's list (e.g. ``model_names=[a,b]`` on the command line): a
    non-empty list of names, each one of ``names``."""
    if not isinstance(selected, Sequence) or isinstance(selected, str) or not all(isinstance(n, str) for n in selected):
        raise ValueError(f"`{field}`: a list of names, e.g. {field}=[{names[0] if names else 'NAME'}]")
    if not selected:
        raise ValueError(f"`{field}` is empty; choose from the config's models {names}")
    unknown = [n for n in selected if n not in names]
    if unknown:
        raise ValueError(f"`{field}`: {unknown} not among the config's models {names}")
    return set(selected)
