"""Every environment variable moe-restore reads, its default, and when it is read.

This module is the only one in ``moe_restore`` (kernels and package alike) that reads
``os.environ``; everything else calls the functions below or takes arguments. It sits in the
bottom layer (``moe_restore.kernels``, which the rest of the package imports) so that one module
can serve the kernels, the command line and the benchmarks without a layer importing upwards:
the package-level variables (``MOE_RESTORE_DEBUG``, ``MOE_RESTORE_RESULTS_DIR``) are plain strings
read here, they need nothing from the layers above.

When: ``TRITON_INTERPRET`` is read once, when this module is first imported (the first import of
``moe_restore.kernels``): Triton decides at decoration time whether a kernel is interpreted, so a
later change cannot change how the kernels already defined run. Every other variable is read
each time its function is called; the table says when that is. The kernel-configuration switches
are consulted when a kernel is defined (the import of its module), so they too must be set before
the first import to take effect.

=================================  =========  ==========================================================  ============================
variable                           default    meaning                                                      read
=================================  =========  ==========================================================  ============================
``TRITON_INTERPRET``               ``0``      ``1``: Triton kernels run under Triton's CPU interpreter      once, at first import
                                              (the backend rule then offers "triton" on CPU tensors)
``MOE_RESTORE_AUTOTUNE``           ``1``      ``0``: every kernel uses its default configuration only       when a kernel is defined
``MOE_RESTORE_CONFIG_<KERNEL>``    unset      ``"BLOCK_M=64,num_warps=4,..."``: pins the configuration of   when a kernel is defined
                                              one kernel (``<KERNEL>``: its name in upper case)
``MOE_RESTORE_DETERMINISTIC``      ``0``      ``1``: deterministic mode, every kernel pinned to its         when a kernel is defined
                                              default configuration (as ``torch.use_deterministic_
                                              algorithms(True)`` does)
``MOE_RESTORE_MLP_PATH``           ``auto``   ``auto`` | ``fused`` | ``grouped``: the expert-MLP path      every ``moe_mlp`` call
                                              (``fused`` needs D, D_out <= 64)
``MOE_RESTORE_ROW_SPLITS``         rule       parts each expert's rows are split into for the expert-MLP   every backward call
                                              weight-gradient reductions, int >= 1 (default: enough
                                              programs to fill a GPU's SMs; 1 off CUDA)
``MOE_RESTORE_SCAN_CHUNK``         rule       tokens per chunk of the scan kernels, a power of two >= 16   every scan call
                                              (default: 64 to 256, growing with the sequence length)
``MOE_RESTORE_SCAN_CARRY_BLOCK``   ``32``     chunk states the scan's carry kernel combines per step, a    every scan call
                                              power of two >= 2
``MOE_RESTORE_DEBUG``              unset      anything but empty or ``0``: ``moe-restore`` shows the       every ``moe-restore`` run
                                              traceback of every error (as ``--debug``)
``MOE_RESTORE_RESULTS_DIR``        see right  where benchmarks write their JSON (default: ``benchmarks/     every results write
                                              results/`` under the working directory)
=================================  =========  ==========================================================  ============================

Read elsewhere, by design (the test ``tests/properties/test_settings.py`` lists these exceptions):

* ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun's, default 0, 1, 0): read by
  ``moe_restore.train.distributed`` when it sets up the process group; they are the launcher's
  inputs, not this library's settings.
* ``kernels/compile_check.py`` copies the environment into its build subprocesses (dropping the
  configuration switches above and pinning ``TRITON_INTERPRET``); ``kernels/_compile_record.py``,
  which runs in such a subprocess, removes the launch-size pins so that it records the default
  launches. Both write the environment of a process they own; neither reads a setting.
* ``MOE_RESTORE_TEST_ALL_FAMILIES=1``: a switch of the test suite, not the library (read by
  ``tests/integration/test_integration_compile.py``: compile every family that uses transformers' experts hook).

The launch sizes exist so that a test can make short inputs cross several row splits, chunks and
carry blocks: the test suite pins small values (tests/conftest.py), and a test may
``monkeypatch.setenv`` them, since they are read at every call.
"""
from __future__ import annotations

import os
from pathlib import Path

#: ``TRITON_INTERPRET=1`` when this module was first imported (see the module docstring).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

MLP_PATHS = ("auto", "fused", "grouped")


def autotune() -> bool:
    """Whether kernels may autotune over their candidate configurations (``MOE_RESTORE_AUTOTUNE``)."""
    return os.environ.get("MOE_RESTORE_AUTOTUNE", "1") != "0"


def deterministic_requested() -> bool:
    """Whether ``MOE_RESTORE_DETERMINISTIC=1`` asks for deterministic mode (the torch switch,
    ``torch.use_deterministic_algorithms``, is checked by ``_tuning.deterministic``)."""
    return os.environ.get("MOE_RESTORE_DETERMINISTIC", "0") == "1"


def pinned_config(kernel: str) -> dict[str, int] | None:
    """The configuration ``MOE_RESTORE_CONFIG_<KERNEL>`` pins for ``kernel`` (meta-parameters and
    ``num_warps``/``num_stages`` by name), or None when unset; an item that is not ``KEY=INT``
    raises ValueError."""
    text = os.environ.get(f"MOE_RESTORE_CONFIG_{kernel.upper()}")
    if not text:
        return None
    pinned = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"cannot parse kernel configuration item {item!r} (want KEY=INT)")
        pinned[key.strip()] = int(value)
    return pinned


def mlp_path() -> str:
    """The expert-MLP path ``MOE_RESTORE_MLP_PATH`` asks for: "auto" (default), "fused" or
    "grouped"; anything else raises ValueError."""
    choice = os.environ.get("MOE_RESTORE_MLP_PATH", "auto")
    if choice not in MLP_PATHS:
        raise ValueError(f"MOE_RESTORE_MLP_PATH must be auto, fused or grouped, got {choice!r}")
    return choice


def _launch_size(variable: str, default: int, *, power_of_two: bool = False, minimum: int = 1) -> int:
    """The launch size pinned by ``variable``, else ``default``; a pinned value that is not an int
    >= ``minimum`` (and a power of two when asked) raises ValueError naming the variable."""
    text = os.environ.get(variable)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < minimum or (power_of_two and value & (value - 1)):
        kind = "a power of two" if power_of_two else "an integer"
        raise ValueError(f"{variable} must be {kind} >= {minimum}, got {text!r}")
    return value


def row_splits(default: int) -> int:
    """``MOE_RESTORE_ROW_SPLITS`` (an int >= 1), else ``default`` (the rule's value)."""
    return _launch_size("MOE_RESTORE_ROW_SPLITS", default)


def scan_chunk(default: int) -> int:
    """``MOE_RESTORE_SCAN_CHUNK`` (a power of two >= 16), else ``default`` (the rule's value)."""
    return _launch_size("MOE_RESTORE_SCAN_CHUNK", default, power_of_two=True, minimum=16)


def scan_carry_block() -> int:
    """``MOE_RESTORE_SCAN_CARRY_BLOCK`` (a power of two >= 2), else 32."""
    return _launch_size("MOE_RESTORE_SCAN_CARRY_BLOCK", 32, power_of_two=True, minimum=2)


def debug() -> bool:
    """Whether ``MOE_RESTORE_DEBUG`` asks the command line for full tracebacks (set, not "0")."""
    return os.environ.get("MOE_RESTORE_DEBUG", "") not in ("", "0")


def results_dir() -> Path:
    """Where benchmark results go: ``MOE_RESTORE_RESULTS_DIR``, else ``benchmarks/results/`` under
    the working directory (never beside the benchmark files, which may sit inside an installed
    package)."""
    return Path(os.environ.get("MOE_RESTORE_RESULTS_DIR") or Path.cwd() / "benchmarks" / "results")
