"""One settings module: it alone reads the environment, and its table (and docs/settings.md) lists
every variable it reads."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from moe_restore.kernels import settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "kernels" / "settings.py"
_ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}

# The documented exceptions (settings' docstring says why): a launcher's variables, and processes
# whose environment the library builds or resets itself.
EXCEPTIONS = {
    "moe_restore/train/distributed.py": "torchrun's RANK, WORLD_SIZE, LOCAL_RANK",
    "kernels/compile_check.py": "the environment of its build subprocesses",
    "kernels/_compile_record.py": "unpins the launch sizes inside such a subprocess",
}
# A variable's name; ``MOE_RESTORE_CONFIG_<KERNEL>`` (and its f-string) reads as MOE_RESTORE_CONFIG.
_VARIABLE = re.compile(r"MOE_RESTORE_[A-Z_]*[A-Z]|TRITON_INTERPRET")


def _touches_environment(path: Path) -> bool:
    """Whether the module at ``path`` uses ``os.environ`` / ``os.getenv`` (or imports them from os)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in _ENVIRONMENT_NAMES \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(alias.name in _ENVIRONMENT_NAMES for alias in node.names):
            return True
    return False


def test_only_the_settings_module_reads_the_environment():
    readers = {str(path.relative_to(ROOT)) for folder in ("kernels", "moe_restore")
               for path in sorted((ROOT / folder).rglob("*.py")) if _touches_environment(path)}
    assert "kernels/settings.py" in readers  # the detector sees the one module that must read
    assert readers - {"kernels/settings.py"} == set(EXCEPTIONS), "route new environment reads through settings"


def test_the_detector_sees_each_spelling(tmp_path):
    cases = {"import os\nos.environ.get('X')\n": True, "import os\nos.getenv('X')\n": True,
             "from os import environ\n": True, "import os\nos.path.join('a')\n": False,
             "environ = {}\nenviron.get('X')\n": False}
    for text, expected in cases.items():
        path = tmp_path / "m.py"
        path.write_text(text)
        assert _touches_environment(path) is expected, text


def test_the_table_lists_every_variable_read():
    source = SETTINGS.read_text()
    tree = ast.parse(source)
    code = "\n".join(source.splitlines()[tree.body[1].lineno - 1:])  # everything after the docstring
    read = set(_VARIABLE.findall(code))
    assert {"TRITON_INTERPRET", "MOE_RESTORE_CONFIG", "MOE_RESTORE_SCAN_CHUNK", "MOE_RESTORE_DEBUG"} <= read
    lines = ast.get_docstring(tree).splitlines()
    borders = [i for i, line in enumerate(lines) if line.startswith("=====")]
    table = set(_VARIABLE.findall("\n".join(lines[borders[0]:borders[-1]])))
    assert read <= table, read - table
    docs = set(_VARIABLE.findall((ROOT / "docs" / "settings.md").read_text()))
    assert read <= docs, read - docs


def test_mlp_path_is_checked(monkeypatch):
    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "fastest")
    with pytest.raises(ValueError, match="MOE_RESTORE_MLP_PATH must be auto, fused or grouped, got 'fastest'"):
        settings.mlp_path()
    monkeypatch.delenv("MOE_RESTORE_MLP_PATH")
    assert settings.mlp_path() == "auto"


@pytest.mark.parametrize("text,expected", [("", 7), ("3", 3)])
def test_row_splits_pinned_or_default(monkeypatch, text, expected):
    monkeypatch.setenv("MOE_RESTORE_ROW_SPLITS", text)
    assert settings.row_splits(7) == expected


@pytest.mark.parametrize("text", ["0", "two", "-1"])
def test_bad_row_splits_name_the_variable(monkeypatch, text):
    monkeypatch.setenv("MOE_RESTORE_ROW_SPLITS", text)
    with pytest.raises(ValueError, match="MOE_RESTORE_ROW_SPLITS must be an integer >= 1"):
        settings.row_splits(7)


@pytest.mark.parametrize("text,expected", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_debug(monkeypatch, text, expected):
    if text is None:
        monkeypatch.delenv("MOE_RESTORE_DEBUG", raising=False)
    else:
        monkeypatch.setenv("MOE_RESTORE_DEBUG", text)
    assert settings.debug() is expected
