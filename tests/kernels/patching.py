"""Patching in tests: `patch_model` that remembers what it patched, and an autouse fixture that unpatches it all at
the end of each test, so the module-level RoPE switches never leak into the next test. Import both into a test
module (importing the fixture registers it there)."""

import pytest

from sloth_kernels import patch as patch_module
from sloth_kernels.patch import unpatch_model

_patched: list = []


@pytest.fixture(autouse=True)
def unpatch_afterwards():
    yield
    while _patched:
        unpatch_model(_patched.pop())


def patch_model(model, **kwargs):
    _patched.append(model)
    return patch_module.patch_model(model, **kwargs)
