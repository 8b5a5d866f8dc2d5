"""Counting the kernel launches a piece of code makes, on CPU under Triton's interpreter (TRITON_INTERPRET=1).

`count_launches()` is a context manager yielding a `Counter`: key `"triton:<kernel name>"` for every Triton launch
(`kernel[grid](...)`), `"aten:<op>"` for every ATen op that launches a device kernel on CUDA (what a training step's
host pays ~10-80 us for per call). Not counted: view and metadata ops (`view`, `t`, `slice`, `as_strided`, ...,
everything ATen marks as a view), bare allocations (`empty*`), and the ATen ops Triton's interpreter itself makes to
move a launch's arguments in and out (they do not exist on CUDA).

How: Triton launches through the interpreter's `InterpretedFunction.__getitem__` (patched at class level for the
duration), ATen ops through a `TorchDispatchMode`; the mode is thread-local, so the backward must run in the thread
that counts (it does on CPU). On CUDA the same code makes the same calls, since every op dispatches on tensor
type alone (`sloth_kernels._dispatch.use_triton`) and no kernel's launch count depends on the device.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or describe memory without running a kernel.
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
    "_to_copy_noop", "set_", "resize_", "is_pinned", "_has_compatible_shallow_copy_type", "record_stream",
}


class _Counting(TorchDispatchMode):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_KERNEL:
                self.counter[f"aten:{name}"] += 1
        return out


@contextlib.contextmanager
def count_launches():
    """Count Triton launches and kernel-launching ATen ops made inside the block (CPU, interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    counter: Counter = Counter()
    mode = _Counting(counter)
    original = InterpretedFunction.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)

        def counted(*args, **kwargs):
            counter[f"triton:{self.fn.__name__}"] += 1
            mode.paused += 1  # the interpreter's own copies of the arguments are no launches
            try:
                return launch(*args, **kwargs)
            finally:
                mode.paused -= 1

        return counted

    InterpretedFunction.__getitem__ = getitem
    try:
        with mode:
            yield counter
    finally:
        InterpretedFunction.__getitem__ = original


def total(counter: Counter) -> int:
    return sum(counter.values())
