"""The Triton interpreter's (``TRITON_INTERPRET=1``) quirks: what it computes wrong, and its
compatibility with numpy >= 2.4.

``interpreter_dot_is_wrong``: a bfloat16 ``tl.dot`` under the interpreter computes wrong values,
so the ops refuse it (except while the compile check only records launches, ``launches_only``).

numpy >= 2.4: the interpreter holds a scalar (a kernel's int argument, a program id, a value loaded from memory)
as a numpy array of shape (1,), and converts it to a Python int with ``__index__`` wherever the
kernel uses it as one: the bounds of every ``range`` with runtime bounds (``range(K)``,
``range(start, end, BLOCK)`` over a chunk or an expert's rows). Triton 3.9's conversion squeezes
the array first; Triton 3.6's is ``int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional
arrays can be converted to Python scalars"), so on that pair every such loop raises. The bounds
are data-dependent (an expert's rows come from the routing offsets), so no kernel-side spelling
(a constexpr bound) can avoid the conversion; the interpreter's conversion is made to squeeze, as
3.9's does, where the installed one fails on a shape-(1,) array. Compiled kernels are unaffected.
"""
from __future__ import annotations

import contextlib
import operator
from types import SimpleNamespace

import numpy as np
import torch

from . import settings


class _Scope:
    """The interface of the interpreter's patch scope that ``_patch_lang_tensor`` uses."""

    @staticmethod
    def set_attr(obj: object, name: str, value: object) -> None:
        setattr(obj, name, value)


def _converts_shape_one(patch_lang_tensor) -> bool:
    """Whether the scalar conversion that ``patch_lang_tensor`` installs takes a shape-(1,) array."""
    probe = type("Probe", (), {})
    patch_lang_tensor(probe, _Scope())
    scalar = probe()
    scalar.handle = SimpleNamespace(data=np.zeros(1, dtype=np.int32))
    try:
        operator.index(scalar)
    except TypeError:
        return False
    return True


def squeeze_scalar_index() -> None:
    """Make the installed interpreter's scalar-to-int conversion squeeze its array (see the module
    docstring), where it fails on a shape-(1,) array; a no-op elsewhere. Idempotent."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or _converts_shape_one(patch):
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


# True while the compile check records interpreted launches without executing them.
_LAUNCHES_ONLY = False


@contextlib.contextmanager
def launches_only():
    """A context in which interpreted kernel launches are recorded, not executed (the compile
    check's recorder), so that refusals which protect computed values do not apply."""
    global _LAUNCHES_ONLY
    saved, _LAUNCHES_ONLY = _LAUNCHES_ONLY, True
    try:
        yield
    finally:
        _LAUNCHES_ONLY = saved


def interpreter_dot_is_wrong(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a Triton ``tl.dot`` of ``dtype`` operands on ``device`` would compute wrong values:
    bfloat16 under the interpreter (measured: relative error 4e10 on a 7-token expert MLP; float16
    and float32 are right), unless launches are only recorded (``launches_only``)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and settings.INTERPRET and not _LAUNCHES_ONLY
