"""Every code block of the README and docs/ runs as written on a CPU-only machine: each ``python``
block in a fresh interpreter (in an empty folder, without TRITON_INTERPRET, as a user would run
it), and each ``moe-restore`` / ``python -m`` line of a ``bash`` block is accepted by the command
line parser or names an importable module. A block preceded by ``<!-- docs-test: skip (why) -->``
(a signature listing) is left out, with its reason."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moe_restore.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- docs-test: skip \((.+)\) -->\n$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def _blocks(language: str) -> list:
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) != language:
                continue
            line = text[:match.start()].count("\n") + 1
            before = text[:match.start()].splitlines(keepends=True)[-1:] or [""]
            skip = SKIP.search(before[0])
            marks = [pytest.mark.skip(reason=skip.group(1))] if skip else []
            blocks.append(pytest.param(match.group(2), id=f"{document.name}:{line}", marks=marks))
    return blocks


def _commands(block: str) -> list[list[str]]:
    """The block's command lines, continuations joined, comments dropped, split like a shell."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("code", _blocks("python"))
def test_python_block_runs_as_written(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only machine, whatever this one has
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("block", _blocks("bash"))
def test_bash_block_commands_are_accepted(block):
    parser = build_parser()
    for words in _commands(block):
        for start in [i for i, word in enumerate(words) if word == "moe-restore"]:
            command = words[start + 1:]
            end = next((i for i, word in enumerate(command) if word in ("&&", "||", ";", "|")), len(command))
            command = command[:end]
            if "..." in command:  # an elided command line: "moe-restore train ..."
                continue
            try:
                parser.parse_args(command)
            except SystemExit as exit_info:
                assert exit_info.code == 0, f"moe-restore {' '.join(command)}: refused by the parser"
        if words[:2] in (["python", "-m"], ["python3", "-m"]) and words[2] not in ("venv", "pip"):
            assert words[2].split(".")[0] == "moe_restore" and importlib.util.find_spec(words[2]) is not None, \
                f"python -m {words[2]}: no such module of the installed package"
