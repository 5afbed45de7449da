"""Device-independent counts of the memory traffic and the matrix FLOPs of every launch in a step.

``count_launches(step)`` runs ``step()`` on CPU tensors and returns one ``Launch`` per Triton
kernel launch and per aten op, in order:

* Triton kernels run under the interpreter (``TRITON_INTERPRET=1`` before the kernels were
  defined). The interpreter's loads, stores, atomics and dots are instrumented: every unmasked
  lane of a load or store is one element access at a byte address, every ``tl.dot`` of an
  [M, K] by [K, N] tile is 2*M*N*K FLOPs (masked-off rows included: the tensor cores compute the
  whole tile). Per launch, *requested* bytes add up every access (what an uncached memory system
  would move); *distinct* bytes count each address once (what reaches DRAM when the caches keep
  every re-read on chip: the lower bound a roofline uses). Reads and writes are counted apart, so
  an address read and written costs both.
* aten ops are seen through a ``TorchDispatchMode``: each op reads its tensor arguments and
  writes its outputs (an in-place or ``out=`` argument is written; ``copy_``, ``fill_`` and
  ``zero_`` do not read their destination). Views, allocations and metadata ops move nothing.
  A tensor with a zero stride (an expand) has fewer distinct than requested bytes. FLOPs come from
  ``torch.utils.flop_counter``'s registry (matrix products and convolutions, 2 per multiply-add);
  elementwise arithmetic is not counted, for Triton kernels either: both rooflines use the
  tensor-core rate. A gather (``index_select``, ``gather``, ``embedding``, ``index``) reads at
  most as many source bytes as it writes.

Each launch is labelled with the Python function that issued it (the first frame outside torch,
Triton and the benchmark drivers; "autograd" for autograd's own ops) and the phase the caller set (``Counter.phase``), so that a table can
say which part of a layer a launch belongs to. The counts depend only on shapes, dtypes, launch
configurations and (through gathers) index values, never on the machine.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import flop_registry

from moe_restore.kernels import settings

# Ops that allocate, alias or inspect without moving tensor data.
_NO_TRAFFIC = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_assert_async",
}
# Ops that write their first argument without reading it.
_WRITE_ONLY_FIRST = {"copy_", "fill_", "zero_"}
# Factories that take only the dtype and device of their tensor argument: they write their output alone.
_READ_NOTHING = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like"}
# Ops that read only the source elements they gather (at most as many as they write).
_GATHERS = {"index_select", "gather", "embedding", "index"}


@dataclass
class Launch:
    """Traffic and FLOPs of one kernel launch (``kind`` "triton") or aten op (``kind`` "aten")."""

    name: str
    kind: str
    phase: str
    caller: str
    read_distinct: int = 0
    write_distinct: int = 0
    read_requested: int = 0
    write_requested: int = 0
    flops: int = 0

    @property
    def distinct_bytes(self) -> int:
        return self.read_distinct + self.write_distinct

    @property
    def requested_bytes(self) -> int:
        return self.read_requested + self.write_requested

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "distinct_bytes": self.distinct_bytes, "requested_bytes": self.requested_bytes}


_THIS = os.path.abspath(__file__)
_HERE = os.path.dirname(_THIS)


def _caller() -> str:
    """``module.function`` of the innermost frame outside torch and Triton, or "autograd" when the
    op came straight from a benchmark driver (this folder) through torch: an op of autograd's own
    backward (the Linear's gradient products, gradient accumulation)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        module = frame.f_globals.get("__name__", "")
        if path != _THIS and os.path.dirname(path) == _HERE:
            return "autograd"
        if path != _THIS and not module.startswith(("torch", "triton", "contextlib")):
            return f"{module.rsplit('.', 1)[-1]}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "autograd"


class _AddressLog:
    """Bytes one launch reads (or writes): requested adds up every access; distinct marks the first
    byte of each element accessed in a map of the launch's buffers (``np.zeros`` pages are only
    allocated where touched), holding its size."""

    def __init__(self, bases: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.bases, self.starts, self.ends = bases, starts, ends
        self.marks = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
        self.requested = 0

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        flat = addresses.reshape(-1).astype(np.uint64, copy=False)
        if flat.size == 0:
            return
        self.requested += flat.size * itemsize
        which = np.searchsorted(self.bases, flat, side="right") - 1
        if (which < 0).any():
            raise RuntimeError("a kernel accessed memory outside its tensor arguments")
        offsets = (flat - self.bases[which]).astype(np.int64) + self.starts[which]
        if (offsets + itemsize > self.ends[which]).any():
            raise RuntimeError("a kernel accessed memory outside its tensor arguments")
        self.marks[offsets] = itemsize

    def distinct(self) -> int:
        return int(self.marks.sum(dtype=np.int64))


class _KernelRecord:
    """The accesses and dots of the Triton launch now running, over the host copies of its tensor
    arguments (known once the interpreter has made them)."""

    def __init__(self) -> None:
        self.reads: _AddressLog | None = None
        self.writes: _AddressLog | None = None
        self.flops = 0

    def set_buffers(self, tensors: list[torch.Tensor]) -> None:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        bases = np.array(sorted(storages), dtype=np.uint64)
        sizes = np.array([storages[int(b)] for b in bases], dtype=np.int64)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        self.reads, self.writes = _AddressLog(bases, starts, ends), _AddressLog(bases, starts, ends)


def _itemsize(pointers) -> int:
    return pointers.get_element_ty().primitive_bitwidth // 8


class Counter:
    """Collects ``Launch`` records; ``phase`` labels the launches that follow."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.phase = "step"
        self._kernel: _KernelRecord | None = None

    # -- Triton interpreter hooks ----------------------------------------------------------
    @contextlib.contextmanager
    def _interpreter_hooks(self) -> Iterator[None]:
        from triton.runtime import interpreter

        builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
        counter = self
        originals = {name: getattr(builder, name) for name in (
            "create_masked_load", "create_masked_store", "create_dot", "create_atomic_rmw", "create_atomic_cas")}
        original_call, original_init = executor.__call__, executor._init_args_hst

        def init_args(grid_executor, args_dev, kwargs):
            args_hst, kwargs_hst = original_init(grid_executor, args_dev, kwargs)
            leaves = torch.utils._pytree.tree_leaves((args_hst, kwargs_hst))
            counter._kernel.set_buffers([interpreter._unwrap_tensor(t) for t in leaves if hasattr(t, "data_ptr")])
            return args_hst, kwargs_hst

        def masked_load(ptrs, mask, other, cache_policy, is_volatile):
            counter._kernel.reads.add(ptrs.data[mask.data], _itemsize(ptrs))
            return originals["create_masked_load"](ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(ptrs, value, mask, cache_policy):
            counter._kernel.writes.add(ptrs.data[mask.data], _itemsize(ptrs))
            return originals["create_masked_store"](ptrs, value, mask, cache_policy)

        def dot(a, b, d, input_precision, max_num_imprecise_acc):
            (m, k), n = a.data.shape[-2:], b.data.shape[-1]
            batch = int(np.prod(a.data.shape[:-2], dtype=np.int64))
            counter._kernel.flops += 2 * batch * m * n * k
            return originals["create_dot"](a, b, d, input_precision, max_num_imprecise_acc)

        def atomic_rmw(op, ptr, val, mask, sem, scope):
            for log in (counter._kernel.reads, counter._kernel.writes):
                log.add(ptr.data[mask.data], _itemsize(ptr))
            return originals["create_atomic_rmw"](op, ptr, val, mask, sem, scope)

        def atomic_cas(ptr, cmp, val, sem, scope):
            for log in (counter._kernel.reads, counter._kernel.writes):
                log.add(ptr.data, _itemsize(ptr))
            return originals["create_atomic_cas"](ptr, cmp, val, sem, scope)

        def launch(grid_executor, *args, **kwargs):
            # The interpreter's copies of the arguments to and from the host are not the kernel's
            # traffic: no aten op is recorded while a kernel runs.
            record = Launch(grid_executor.fn.__name__, "triton", counter.phase, _caller())
            counter._kernel = _KernelRecord()
            try:
                with _disable_current_modes():
                    result = original_call(grid_executor, *args, **kwargs)
                k = counter._kernel
                record.read_distinct, record.write_distinct = k.reads.distinct(), k.writes.distinct()
                record.read_requested, record.write_requested, record.flops = k.reads.requested, k.writes.requested, k.flops
                counter.launches.append(record)
                return result
            finally:
                counter._kernel = None

        for name, hook in (("create_masked_load", masked_load), ("create_masked_store", masked_store),
                           ("create_dot", dot), ("create_atomic_rmw", atomic_rmw), ("create_atomic_cas", atomic_cas)):
            setattr(builder, name, hook)
        executor.__call__, executor._init_args_hst = launch, init_args
        try:
            yield
        finally:
            for name in originals:
                delattr(builder, name)  # the instance attribute shadowed the class's method
            executor.__call__, executor._init_args_hst = original_call, original_init

    # -- aten ops ---------------------------------------------------------------------------
    def _record_aten(self, func, args, kwargs, out) -> None:
        name = func.__name__.split(".")[0]
        if func.is_view or name in _NO_TRAFFIC:
            return
        record = Launch(f"aten.{name}", "aten", self.phase, _caller())
        schema_args = func._schema.arguments
        written_args = set()
        for i, arg in enumerate(schema_args):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written_args.add(arg.name)
        values = {arg.name: (args[i] if i < len(args) else kwargs.get(arg.name)) for i, arg in enumerate(schema_args)}
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        out_bytes = sum(t.numel() * t.element_size() for t in outputs)
        accessed_args = () if name in _READ_NOTHING else schema_args
        for position, arg in enumerate(accessed_args):
            tensors = [t for t in torch.utils._pytree.tree_leaves(values[arg.name]) if isinstance(t, torch.Tensor)]
            for t in tensors:
                if arg.name in written_args:
                    record.write_distinct += _distinct_bytes(t)
                    record.write_requested += t.numel() * t.element_size()
                    if position == 0 and name in _WRITE_ONLY_FIRST:
                        continue
                distinct, requested = _distinct_bytes(t), t.numel() * t.element_size()
                if name in _GATHERS and position == 0:
                    distinct, requested = min(distinct, out_bytes), min(requested, out_bytes)
                record.read_distinct += distinct
                record.read_requested += requested
        if not written_args:  # functional op: its outputs are fresh tensors
            record.write_distinct += sum(_distinct_bytes(t) for t in outputs)
            record.write_requested += out_bytes
        packet = func._overloadpacket
        if packet in flop_registry:
            record.flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        self.launches.append(record)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly expanded) view addresses."""
    if t.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


class _AtenMode(TorchDispatchMode):
    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            # A custom op (the library's Triton ops): run its Python body with this mode back on,
            # so that its kernels and the aten ops around them are counted one by one.
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func._can_decompose():
            # A composite op (e.g. ``to``, which copies only when the dtype changes): count the
            # ops it is made of.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self.counter._record_aten(func, args, kwargs, out)
        return out


def interpreter_on() -> bool:
    """Whether Triton kernels defined in this process run under the interpreter."""
    return settings.INTERPRET


def count_launches(step: Callable[[Counter], Any]) -> list[Launch]:
    """Run ``step(counter)`` (which may set ``counter.phase``) and return its launches in order.

    Needs the Triton interpreter (``TRITON_INTERPRET=1`` before the first import of the kernels)
    when ``step`` launches Triton kernels; raises RuntimeError otherwise, rather than counting
    compiled launches as nothing.
    """
    if not interpreter_on():
        raise RuntimeError("count_launches needs TRITON_INTERPRET=1 set before the kernels are imported")
    counter = Counter()
    with counter._interpreter_hooks(), _AtenMode(counter):
        step(counter)
    return counter.launches
