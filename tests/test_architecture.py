"""Every import between the project's packages points down the layer stack, and no two parts import each other.

Read statically with ``ast`` (every ``import`` anywhere in a file, lazy ones inside functions included; nothing is
executed), over the installed packages as pyproject.toml maps them (``recipes/`` -> ``mla_recipes``, ``configs/``
-> ``mla_recipes.configs``). A new module must be placed in :data:`LAYERS`; a new upward import fails
:func:`test_no_upward_import` unless it is listed in :data:`ALLOWED` with its reason.
"""

import ast
from collections.abc import Iterable
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]

# Bottom to top: a unit may import units of lower layers only (and itself). Units of one layer are peers and do
# not import each other. Each unit is a list of module-name prefixes ("=name": that module only, so a new top-level
# module of mla_components is never placed by accident).
LAYERS: list[dict[str, list[str]]] = [
    {
        # Triton ops, their autograd Functions, the fp8 cache format, fp64/PyTorch test references
        "kernels": ["mla_kernels"],
        # adapters of third-party internals (Torchtune, Triton's interpreter, lm-eval); import nothing of the project
        "compat": ["mla_components.compat"],
        # config-field checks (positive integers, even rope dims) shared by every layer
        "validation": ["mla_components._validation"],
        # the optimizer of the bf16 recipes (fp32 master weights); torch only
        "optim": ["mla_components.optim"],
        # training losses for Torchtune's recipes (DPO with an NLL anchor); torch and torchtune only
        "losses": ["mla_components.losses"],
    },
    # attention (with its PyTorch absorbed decode), RoPE incl. the Triton-backed one, KV cache, kernel_backend policy
    {"modules": ["mla_components.modules"]},
    # model builders and configs; datasets and tokenizers sit beside them
    {"models": ["mla_components.models"], "data": ["mla_components.data"]},
    # all HF I/O; decoding and cache accounting over any built model
    {
        "checkpointing": ["mla_components.checkpointing"],
        "decoding": ["mla_components.decoding"],
        "kv_cache_report": ["mla_components.kv_cache_report"],
    },
    {
        "export": ["mla_components.export"],
        "evaluation": ["mla_components.evaluation"],
        "conversion": ["mla_components.conversion"],
        "tracking": ["mla_components.tracking"],
        "preflight": ["mla_components.preflight"],
    },
    # what users run: mla-tune, mla-demo, the recipes and their configs; and the package root, which re-exports
    # the model builders (``from mla_components import mla_tiny``)
    {
        "cli": ["mla_components.cli"],
        "main": ["mla_components.main"],
        "recipes": ["mla_recipes"],
        "package root": ["=mla_components"],
    },
]

# (importing unit, imported unit) -> why this upward or sideways import is allowed. Keep it short.
ALLOWED: dict[tuple[str, str], str] = {}


def package_dirs() -> dict[str, Path]:
    """Installed top-level package name -> its folder (pyproject.toml ``package-dir``)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in setuptools["package-dir"].items() if "." not in name}


def project_modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def unit_of(module: str) -> tuple[int, str] | None:
    """``(layer index, unit name)`` of the longest matching prefix, or None for a module in no layer."""
    best = None
    for index, layer in enumerate(LAYERS):
        for unit, prefixes in layer.items():
            for prefix in prefixes:
                exact = prefix.startswith("=")
                prefix = prefix.removeprefix("=")
                matches = module == prefix or (not exact and module.startswith(prefix + "."))
                if matches and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), index, unit)
    return None if best is None else best[1:]


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> list[tuple[int, str]]:
    """``(line, imported project module)`` for every import statement of ``source`` (the text of ``module``);
    ``from X import Y`` counts as importing ``X.Y`` when that is a module, else ``X``."""
    known = set(known)
    roots = {name.split(".")[0] for name in known}
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in dict.fromkeys(targets) if t.split(".")[0] in roots]
    return found


def violations(modules: dict[str, tuple[str, bool]]) -> tuple[list[str], dict[str, set[str]]]:
    """Upward, sideways and unplaced imports of ``modules`` (dotted name -> (source, is a package)), and the
    import graph between units."""
    problems, graph = [], {}
    for module, (source, is_package) in modules.items():
        here = unit_of(module)
        if here is None:
            problems.append(f"{module}: not placed in any layer of tests/test_architecture.py")
            continue
        graph.setdefault(here[1], set())
        for line, target in imports_of(source, module, is_package, modules):
            there = unit_of(target)
            if there is None:
                problems.append(f"{module}:{line} imports {target}, which is in no layer")
                continue
            if there[1] == here[1]:
                continue
            graph[here[1]].add(there[1])
            if there[0] < here[0] or (here[1], there[1]) in ALLOWED:
                continue
            kind = "upward" if there[0] > here[0] else "sideways"
            problems.append(
                f"{module}:{line} imports {target}: {kind} import from {here[1]} (layer {here[0]}) "
                f"to {there[1]} (layer {there[0]})"
            )
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _sources() -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in project_modules().items()}


def test_every_module_is_placed_and_every_import_points_down():
    problems, _ = violations(_sources())
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_units():
    _, graph = violations(_sources())
    assert not cycles(graph), cycles(graph)


def test_the_package_code_never_imports_tests_or_benchmarks():
    for name, (source, _) in _sources().items():
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("tests", "benchmarks") for n in names), name


def test_the_check_reports_a_new_upward_import_and_a_cycle():
    """Proof that the check bites: a kernel module importing the attention module, and a modules-level module
    importing a model builder, are both reported, and the resulting unit graph has a cycle."""
    sources = _sources()
    sources["mla_kernels._synthetic"] = ("def f():\n    from mla_components.modules.attention import F\n", False)
    sources["mla_components.modules._synthetic"] = ("from mla_components.models import mla_tiny\n", False)
    problems, graph = violations(sources)
    assert any(
        p.startswith("mla_kernels._synthetic:2 imports mla_components.modules.attention: upward") for p in problems
    )
    assert any(
        p.startswith("mla_components.modules._synthetic:1 imports mla_components.models: upward") for p in problems
    )
    assert ["kernels", "models", "modules"] in cycles(graph)  # kernels -> modules -> models -> kernels
    # a sideways import between peers is reported too, and an unplaced module is named
    sources = _sources()
    sources["mla_components.export._synthetic"] = ("from mla_components.evaluation import passkey\n", False)
    sources["mla_components.newthing"] = ("import torch\n", False)
    problems, _ = violations(sources)
    assert any("export._synthetic:1 imports mla_components.evaluation.passkey: sideways" in p for p in problems)
    assert "mla_components.newthing: not placed in any layer of tests/test_architecture.py" in problems
