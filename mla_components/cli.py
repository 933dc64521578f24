"""``mla-tune``: the project's configs and recipes, the way ``tune ls`` / ``tune cp`` / ``tune run`` show built-ins.

Torchtune's recipe registry is a static list with no plugin hook, so ``tune ls`` cannot show these configs. Each
config names its recipe in its usage line (``tune run [--nproc_per_node N] <recipe> --config configs/<name>.yaml``);
that line is the single source of truth for the listing.

    mla-tune ls                                          # recipes and their configs
    mla-tune cp mla_tiny/sft_distributed my_sft.yaml      # copy a config to edit
    mla-tune validate --config mla_tiny/sft_distributed dataset.context_tokens=4096   # checks in seconds
    mla-tune validate --checkpoint outputs/mla_tiny/sft/epoch_2   # every file against its manifest
    mla-tune run --nproc_per_node 2 full_finetune_distributed --config mla_tiny/sft_distributed epochs=1
    mla-tune convert --config smollm2_135m/convert_mla_256 origin.source=model.gguf   # pretrained GQA -> MLA
"""

import argparse
import os
import re
import shutil
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path

_USAGE = re.compile(r"tune run (?:--nproc_per_node \S+ )?(?P<recipe>\S+) --config configs/(?P<config>\S+)\.yaml")


def configs_root() -> Path:
    """The installed ``configs/`` directory (package ``mla_recipes.configs``)."""
    return Path(str(resources.files("mla_recipes.configs")))


def recipes_root() -> Path:
    return Path(str(resources.files("mla_recipes")))


def project_configs() -> dict[str, tuple[str, Path]]:
    """``{config name: (recipe, path)}`` for every YAML config, read from its usage line."""
    found = {}
    for path in sorted(configs_root().rglob("*.yaml")):
        name = path.relative_to(configs_root()).with_suffix("").as_posix()
        match = _USAGE.search(path.read_text())
        if match is None or match["config"] != name:
            raise ValueError(
                f"{path}: the header must show its usage line: tune run <recipe> --config configs/{name}.yaml"
            )
        found[name] = (match["recipe"], path)
    return found


def resolve_config(name_or_path: str) -> Path:
    """A project config name (``mla_tiny/sft_distributed``) or a YAML path -> a path."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    configs = project_configs()
    name = name_or_path.removeprefix("configs/").removesuffix(".yaml")
    if name not in configs:
        raise SystemExit(f"--config {name_or_path!r}: no such file or project config; `mla-tune ls` lists them")
    return configs[name][1]


def resolve_recipe(name: str) -> str:
    """A custom recipe (``passkey_eval``, ``mla_recipes/passkey_eval.py``) -> ``mla_recipes/<name>.py``, the form
    ``tune run`` turns into the importable module ``mla_recipes.<name>``; built-in recipe names pass unchanged."""
    stem = Path(name).name.removesuffix(".py")
    return f"mla_recipes/{stem}.py" if (recipes_root() / f"{stem}.py").is_file() else name


def _ls() -> None:
    by_recipe = defaultdict(list)
    for name, (recipe, _) in project_configs().items():
        by_recipe[recipe].append(name)
    print(f"{'RECIPE':<36}CONFIG")
    for recipe in sorted(by_recipe):
        for i, name in enumerate(by_recipe[recipe]):
            print(f"{recipe if i == 0 else '':<36}{name}")


def _cp(name: str, destination: str) -> None:
    source = resolve_config(name)
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise SystemExit(f"{target} exists; choose another destination")
    shutil.copyfile(source, target)
    print(f"Copied config to {target}")


def tune_run_argv(args: list[str]) -> list[str]:
    """``tune run`` arguments with the project config name and custom recipe name resolved to files."""
    args = list(args)
    if "--config" not in args:
        raise SystemExit("mla-tune run: --config <name or path> is required")
    at = args.index("--config")
    args[at + 1] = str(resolve_config(args[at + 1]))
    recipe_at = next(i for i in range(at) if not args[i].startswith("-") and not (i and args[i - 1].startswith("--")))
    args[recipe_at] = resolve_recipe(args[recipe_at])
    return ["run", *args]


def _validate_checkpoint(directory: Path) -> None:
    """Check every file of a checkpoint directory against its manifest (sizes, SHA-256); exit 1 naming the file."""
    from mla_components.checkpointing import read_config, verify_manifest
    from mla_components.checkpointing._hf_format import MANIFEST_NAME

    try:
        read_config(directory)
        checked = verify_manifest(directory)
    except (ValueError, OSError) as e:
        raise SystemExit(f"mla-tune: {e}") from None
    if checked is None:
        raise SystemExit(
            f"mla-tune: {directory} has no {MANIFEST_NAME} (written by another tool or an older version): its files "
            "cannot be verified"
        )
    print(f"checkpoint OK: {checked} files match {directory / MANIFEST_NAME}")


def _validate(args: list[str]) -> None:
    """``[--checkpoint DIR] [recipe] --config <name or path> [key=value ...]``: verify a checkpoint directory and/or
    run the preflight checks of a config; exit 1 naming the file and the field."""
    import yaml

    from mla_components.preflight import PreflightError, load_config, preflight

    if "--checkpoint" in args:
        at = args.index("--checkpoint")
        if at + 1 == len(args):
            raise SystemExit("mla-tune validate: --checkpoint needs a directory")
        _validate_checkpoint(Path(args[at + 1]))
        args = args[:at] + args[at + 2 :]
        if "--config" not in args:
            return
    at = args.index("--config")
    overrides = [a for a in args[at + 2 :] if "=" in a or a.startswith("~")]
    path = resolve_config(args[at + 1])
    try:
        preflight(load_config(path, overrides))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).replace("\n", " ")
        raise SystemExit(f"mla-tune: {where}: YAML syntax error: {problem}") from None
    except PreflightError as e:
        raise SystemExit(f"mla-tune: {path}: {e}") from None
    print("config OK")


def _run(args: list[str]) -> None:
    argv = tune_run_argv(args)
    _validate(argv[1:])
    from mla_components.compat.torchtune import cpu_env

    tune = shutil.which("tune") or str(Path(sys.executable).with_name("tune"))
    os.execve(tune, [tune, *argv], cpu_env())  # the CPU fallbacks act only where CUDA is absent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mla-tune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the project's recipes and configs")
    cp = sub.add_parser("cp", help="copy a project config to edit")
    cp.add_argument("config")
    cp.add_argument("destination")
    sub.add_parser("validate", help="check a config (and key=value overrides) before running it", add_help=False)
    sub.add_parser("run", help="validate, then tune run with project names resolved", add_help=False)
    sub.add_parser(
        "convert", help="a pretrained Llama-family model -> MLA (= run convert_to_mla --config ...)", add_help=False
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        if "--config" not in argv:
            raise SystemExit("mla-tune convert: --config <name or path> is required, e.g. smollm2_135m/convert_mla_256")
        argv = ["run", "convert_to_mla", *argv[1:]]
    if argv[:1] in (["run"], ["validate"]):
        if "--config" not in argv and not (argv[0] == "validate" and "--checkpoint" in argv):
            raise SystemExit(
                f"mla-tune {argv[0]}: --config <name or path> (or, to validate, --checkpoint DIR) is required"
            )
        return _run(argv[1:]) if argv[0] == "run" else _validate(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "ls":
        _ls()
    else:
        _cp(args.config, args.destination)


if __name__ == "__main__":
    main()
