"""Registration with transformers is the explicit call ``moe_restore.integration.register()``, which
``import moe_restore`` makes: it works whichever of the two packages a fresh interpreter imports
first, installs no import hook, and does nothing where transformers is absent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers.integrations.moe")

_CHECK = """
import sys
import transformers.integrations.moe as hook
from transformers import PreTrainedConfig
names = {"moe_restore", "moe_restore_torch", "moe_restore_triton"}
assert names <= set(hook.ALL_EXPERTS_FUNCTIONS), sorted(hook.ALL_EXPERTS_FUNCTIONS)
assert getattr(PreTrainedConfig.to_dict, "_moe_restore", False), "config.json would not keep the implementation"
hooks = [finder for finder in sys.meta_path if type(finder).__module__.startswith("moe_restore")]
assert not hooks, hooks
print("registered")
"""


def _fresh(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter outside the repository (so the installed package runs)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("first", ["import moe_restore\nimport transformers",
                                   "import transformers.integrations.moe\nimport moe_restore"])
def test_register_whichever_package_comes_first(first, tmp_path):
    done = _fresh(first + "\n" + _CHECK, tmp_path)
    assert done.returncode == 0 and "registered" in done.stdout, done.stderr[-3000:]


def test_register_without_transformers_does_nothing(tmp_path):
    script = ("import sys\nsys.modules['transformers'] = None  # as if not installed\n"
              "import moe_restore\nassert moe_restore.integration.register() is False\n"
              "assert 'transformers.integrations.moe' not in sys.modules\nprint('nothing')\n")
    done = _fresh(script, tmp_path)
    assert done.returncode == 0 and "nothing" in done.stdout, done.stderr[-3000:]


def test_register_is_idempotent():
    import transformers.integrations.moe as hook
    from transformers import PreTrainedConfig

    import moe_restore

    wrapped = PreTrainedConfig.to_dict
    assert moe_restore.integration.register() is True
    assert PreTrainedConfig.to_dict is wrapped  # not wrapped twice
    assert hook.ALL_EXPERTS_FUNCTIONS["moe_restore"].__name__ == "experts_forward_auto"
