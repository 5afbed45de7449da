"""The kernels install as moe_restore.kernels, never as a top-level ``kernels`` module (that name
belongs to the package diffusers and transformers import); run from the repository root, where the
folder is importable as ``kernels``, it hands that name to the installed package."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_are_a_subpackage():
    kernels = importlib.import_module("moe_restore.kernels")
    assert {"topk_route", "moe_mlp", "Routing"} <= set(kernels.__all__)
    assert Path(kernels.__file__).parent.name == "kernels"


def _installed() -> list[importlib.metadata.Distribution]:
    """The installed distributions, without the source tree's own ``moe_restore.egg-info`` (which
    lists every file of the tree, and which metadata discovery finds when the repository root is on
    sys.path, e.g. under ``python -m pytest`` run from the root)."""
    return [d for d in importlib.metadata.distributions() if Path(d.locate_file("")).resolve() != ROOT]


def test_no_top_level_kernels_module_is_installed():
    (installed,) = [d for d in _installed() if d.metadata["Name"] == "moe-restore"]
    files = installed.files or []
    top_level = {Path(str(f)).parts[0] for f in files}
    assert "kernels" not in top_level and "kernels.py" not in top_level, sorted(top_level)
    # An editable install maps package names to folders through a finder: none may be "kernels".
    for f in files:
        if str(f).endswith("_finder.py"):
            text = Path(f.locate()).read_text()
            assert "'kernels'" not in text and '"kernels"' not in text, f"{f} maps a top-level 'kernels'"
    dist_names = {d.metadata["Name"] for d in _installed() if "kernels" in (d.read_text("top_level.txt") or "").split()}
    assert "moe-restore" not in dist_names


def test_importing_the_library_does_not_shadow_kernels():
    importlib.import_module("moe_restore.kernels")
    module = sys.modules.get("kernels")
    assert module is None or "moe_restore" not in str(getattr(module, "__file__", ""))


def _from_root(*args: str) -> subprocess.CompletedProcess:
    """Run the interpreter with the repository root as working directory (so on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_the_repository_root_hands_kernels_to_hugging_face():
    """From the root, the folder kernels/ is importable as a top-level ``kernels``: it hands the
    name to Hugging Face's package, which transformers then imports, and loads none of its own
    modules under that name."""
    script = ("import sys, transformers.integrations.moe, kernels, moe_restore.kernels as ours; "
              "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__; "
              "assert not [m for m in sys.modules if m.startswith('kernels.') and 'moe_restore' in "
              "str(getattr(sys.modules[m], '__file__', ''))]; print(kernels.__file__, ours.__name__)")
    done = _from_root("-c", script)
    assert done.returncode == 0, done.stderr
    printed, name = done.stdout.split()
    assert not Path(printed).resolve().is_relative_to(ROOT / "kernels") and name == "moe_restore.kernels"


def test_the_repository_root_without_hugging_face_kernels_is_a_clear_import_error():
    script = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
              "try:\n    import kernels\nexcept ModuleNotFoundError as error:\n    print(error.name, '|', error)\n")
    done = _from_root("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("kernels | No module named 'kernels'") and "moe_restore.kernels" in done.stdout


def test_python_m_pytest_runs_from_the_repository_root():
    done = _from_root("-m", "pytest", "-q", "tests/cli/test_packaging.py", "-k", "not repository_root")
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
