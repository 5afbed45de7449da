"""The backend rule and the kernel-configuration switches."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import _backend, _tuning, settings


def test_torch_is_always_available():
    assert _backend.resolve_backend("torch", torch.device("cpu")) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(settings, "INTERPRET", False)
    assert _backend.resolve_backend(None, torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve_backend("triton", torch.device("cpu"))


def test_interpreter_makes_triton_the_default(monkeypatch):
    monkeypatch.setattr(settings, "INTERPRET", True)
    expected = "triton" if _backend.HAS_TRITON else "torch"
    assert _backend.resolve_backend(None, torch.device("cpu")) == expected


def test_unknown_device_type_is_refused(monkeypatch):
    monkeypatch.setattr(settings, "INTERPRET", True)
    with pytest.raises(RuntimeError, match="no backend for device type 'meta'"):
        _backend.resolve_backend("triton", torch.device("meta"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("cuda", torch.device("cpu"))


def test_configs_pin_and_interpreter(monkeypatch):
    pytest.importorskip("triton")
    default = {"BLOCK_M": 32, "num_warps": 4}
    candidates = [{"BLOCK_M": 64, "num_warps": 8}, {"BLOCK_M": 128, "num_warps": 8, "num_stages": 4}]
    monkeypatch.setattr(settings, "INTERPRET", False)
    monkeypatch.delenv("MOE_RESTORE_AUTOTUNE", raising=False)
    assert [c.kwargs["BLOCK_M"] for c in _tuning.kernel_configs("k", default, candidates)] == [32, 64, 128]
    monkeypatch.setenv("MOE_RESTORE_AUTOTUNE", "0")
    assert [c.kwargs["BLOCK_M"] for c in _tuning.kernel_configs("k", default, candidates)] == [32]
    monkeypatch.setenv("MOE_RESTORE_CONFIG_K", "BLOCK_M=16, num_warps=2, num_stages=5")
    (pinned,) = _tuning.kernel_configs("k", default, candidates)
    assert pinned.kwargs == {"BLOCK_M": 16} and pinned.num_warps == 2 and pinned.num_stages == 5
    monkeypatch.setenv("MOE_RESTORE_CONFIG_K", "BLOCK_M")
    with pytest.raises(ValueError, match="KEY=INT"):
        _tuning.kernel_configs("k", default, candidates)
    monkeypatch.delenv("MOE_RESTORE_CONFIG_K")
    monkeypatch.setattr(settings, "INTERPRET", True)
    monkeypatch.delenv("MOE_RESTORE_AUTOTUNE")
    assert len(_tuning.kernel_configs("k", default, candidates)) == 1
