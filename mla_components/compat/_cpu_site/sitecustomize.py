# Put on PYTHONPATH by `mla-tune run` (see mla_components/compat/torchtune.py): Torchtune's distributed recipes on
# a CPU-only machine. A user's own sitecustomize further down the path still runs.
import importlib.util
import sys
from pathlib import Path

from mla_components.compat.torchtune import apply, end_with_launcher

apply()
end_with_launcher()  # a torchrun worker dies with its launcher

_here = Path(__file__).resolve().parent
for _entry in sys.path:
    if _entry and Path(_entry).resolve() != _here and (Path(_entry) / "sitecustomize.py").is_file():
        _spec = importlib.util.spec_from_file_location("_user_sitecustomize", Path(_entry) / "sitecustomize.py")
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
