"""Each adapter of third-party internals (``mla_components/compat/``) still matches the upstream it was written
for: the installed versions are the ones it names (``UPSTREAM``), and the upstream code it wraps, subclasses or
stands in for has the source it was fingerprinted from (``RELIES_ON``). A failure here means: re-read that patch
against the new upstream, then update its pins."""

import importlib
import importlib.metadata
import pkgutil

import pytest

import mla_components.compat as compat

MODULES = [
    importlib.import_module(f"mla_components.compat.{m.name}")
    for m in pkgutil.iter_modules(compat.__path__)
    if not m.name.startswith("_")
]


def test_every_patch_module_names_its_upstream():
    assert {m.__name__.rsplit(".", 1)[1] for m in MODULES} == {"lm_eval", "torchtune", "triton_interpreter"}
    for module in MODULES:
        assert module.UPSTREAM and module.RELIES_ON, module.__name__


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_installed_upstream_is_the_pinned_version(module):
    for dist, version in module.UPSTREAM.items():
        assert importlib.metadata.version(dist) == version, f"{module.__name__} targets {dist}=={version}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_upstream_code_under_the_patch_is_unchanged(module):
    if module.__name__.endswith("lm_eval"):
        module._alias_transformers_v5()  # lm-eval 0.4.8 cannot import under transformers 5 without it
    changed = {path for path, digest in module.RELIES_ON.items() if compat.fingerprint(path) != digest}
    assert not changed, f"{module.__name__}: upstream changed under the patch: {sorted(changed)}"


def test_a_changed_upstream_is_detected(monkeypatch):
    """The fingerprint is of the source: an edited upstream function no longer matches."""
    from torchtune.training import memory

    path = "torchtune.training.memory.cleanup_before_training"
    pinned = importlib.import_module("mla_components.compat.torchtune").RELIES_ON[path]
    assert compat.fingerprint(path) == pinned

    def cleanup_before_training() -> None:  # same name, different body
        pass

    monkeypatch.setattr(memory, "cleanup_before_training", cleanup_before_training)
    assert compat.fingerprint(path) != pinned
