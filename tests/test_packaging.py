"""The wheel contains every package and data file the installed product needs (the layout renames folders, so
setuptools' discovery cannot be used and the list in pyproject.toml is explicit)."""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
RENAMES = {
    "mla_components": "mla_components",
    "recipes": "mla_recipes",
    "configs": "mla_recipes.configs",
    "mla_kernels": "mla_kernels",
}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in RENAMES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *parts)))
    assert found == listed


def test_wheel_ships_configs_recipes_and_data_files(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for path in [
        "mla_recipes/configs/mla_tiny/sft_distributed.yaml",
        "mla_recipes/passkey_eval.py",
        "mla_kernels/mla_decode.py",
        "mla_components/compat/_cpu_site/sitecustomize.py",
        "mla_components/evaluation/lm_eval_tasks/mla_passkey/mla_passkey.yaml",
        "mla_components/data/_tokenizer.py",
    ]:
        assert path in names, path


def test_no_top_level_folder_shadows_an_installed_package():
    """A folder at the repository root is importable under its own name whenever the root is on ``sys.path``
    (``python -m`` from the checkout, pytest), ahead of site-packages: a folder named like another installed
    distribution's package replaces it (a ``kernels/`` folder broke transformers, which imports Hugging Face's
    ``kernels``). Torchtune's ``recipes`` is the one known overlap: nothing imports it by name (``tune run``
    loads its recipe files by path) and ours installs as ``mla_recipes``."""
    ours = {"infinitecontext"}
    owners = importlib.metadata.packages_distributions()
    for folder in REPO.iterdir():
        if not folder.is_dir() or folder.name.startswith(".") or not folder.name.isidentifier():
            continue
        others = set(owners.get(folder.name, [])) - ours
        if folder.name == "recipes":
            others -= {"torchtune"}
        assert not others, f"top-level folder {folder.name}/ shadows the package of {sorted(others)}: rename it"
