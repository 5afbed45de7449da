"""The kernels install as moe_restore.kernels, never as a top-level ``kernels`` module (that name
belongs to the package diffusers and transformers import)."""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path


def test_kernels_are_a_subpackage():
    kernels = importlib.import_module("moe_restore.kernels")
    assert {"topk_route", "moe_mlp", "Routing"} <= set(kernels.__all__)
    assert Path(kernels.__file__).parent.name == "kernels"


def test_no_top_level_kernels_module_is_installed():
    files = importlib.metadata.files("moe-restore") or []
    top_level = {Path(str(f)).parts[0] for f in files}
    assert "kernels" not in top_level and "kernels.py" not in top_level, sorted(top_level)
    # An editable install maps package names to folders through a finder: none may be "kernels".
    for f in files:
        if str(f).endswith("_finder.py"):
            text = Path(f.locate()).read_text()
            assert "'kernels'" not in text and '"kernels"' not in text, f"{f} maps a top-level 'kernels'"
    dist_names = {d.metadata["Name"] for d in importlib.metadata.distributions()
                  if "kernels" in (d.read_text("top_level.txt") or "").split()}
    assert "moe-restore" not in dist_names


def test_importing_the_library_does_not_shadow_kernels():
    importlib.import_module("moe_restore.kernels")
    module = sys.modules.get("kernels")
    assert module is None or "moe_restore" not in str(getattr(module, "__file__", ""))
