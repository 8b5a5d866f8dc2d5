"""One place that decides whether an op runs its Triton kernel or its PyTorch reference.

Contract: `use_triton(*tensors)` is True when any tensor lives on a CUDA device, or when Triton's CPU interpreter
is switched on (`TRITON_INTERPRET=1`, how CPU-only CI runs the kernels); otherwise False and ops use the reference.
"""

import os

import torch


def use_triton(*tensors: torch.Tensor) -> bool:
    # CUDA first: called on every op, and the environment lookup costs more than the tensor check.
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return True
    return os.environ.get("TRITON_INTERPRET") == "1"
