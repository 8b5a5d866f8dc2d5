"""Suite-wide test setup.

Triton kernels run on CUDA when a GPU is present; on CPU-only machines (CI) they run under Triton's interpreter,
which must be switched on before any `@triton.jit` function is defined, so it is set here before tests import
`sloth_kernels`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """Stop every daemon a test started and left running (a test that fails half-way through would otherwise leave
    it training, e.g. 100000 steps, and slow every later test down)."""
    from .daemon_proc import DaemonProcess

    before = set(DaemonProcess.started)
    yield
    for daemon in DaemonProcess.started - before:
        DaemonProcess.started.discard(daemon)
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(timeout=10)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in default model (taught its built-in Q&A), built once per test session."""
    from sloth_daemon.default_model import ensure_default_model

    # A fixed amount of teaching: a busy machine slows the suite down, never changes the model.
    return ensure_default_model(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture
def state_dir(tmp_path, tiny_model) -> Path:
    """A fresh daemon state dir whose model cache already holds the tiny model (so no test rebuilds it)."""
    state = tmp_path / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    return state


@pytest.fixture(scope="session")
def taught_adapter(tmp_path_factory, tiny_model) -> Path:
    """A LoRA on the tiny model taught "You live in Zürich." by the real trainer (`tests/taught_adapter.py`)."""
    from .taught_adapter import train_taught_adapter

    return train_taught_adapter(tiny_model, tmp_path_factory.mktemp("taught") / "adapter")


API_KEY = "test-key"


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory, tiny_model):
    """One real `sloth-daemon serve` (embedded tiny model, API key on, no automatic updates) shared by the HTTP and
    CLI tests; tests that need a pristine daemon start their own."""
    from .daemon_proc import DaemonProcess

    state = tmp_path_factory.mktemp("shared") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    daemon = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_API_KEY": API_KEY,
                                       "SLOTH_TRAIN_STEPS": "20"}).start()
    yield daemon
    daemon.stop()
