"""Suite-wide test setup.

Triton kernels run on CUDA when a GPU is present; on CPU-only machines (CI) they run under Triton's interpreter,
which must be switched on before any `@triton.jit` function is defined, so it is set here before tests import
`sloth_kernels`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
