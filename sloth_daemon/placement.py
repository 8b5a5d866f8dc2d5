"""Placement: which devices the serving engine and the trainer use (config `device`, `train.devices`,
`vllm.tensor_parallel_size`).

Contract:
- `check_device(value)` / `check_train_devices(items)` normalise and validate the config values (the config's
  validators call them; a `ValueError` names what is wrong and what to write instead). A device is `cpu`, `cuda`
  or `cuda:N`; `train.devices` items are `cuda:N`, a bare index `N` (= `cuda:N`) or `cpu`. `cpu` may repeat: each
  entry is one trainer process (gloo; how CPU machines and CI run the multi-process trainer); GPU entries may not
  repeat, and CPU and GPU entries do not mix.
- `train_placement(train_devices, device, environ)` -> `TrainPlacement`: the device each trainer process names in
  its job, how many processes (1 = the single-process trainer; more = torchrun with FSDP, `trainer.distributed`)
  and what the trainer's environment gets (`CUDA_VISIBLE_DEVICES`: the child sees only its own GPUs, so it never
  makes a CUDA context on the serving GPU). An empty `train.devices` trains where the engine serves (as before).
- `serving_env(device, tensor_parallel_size, environ)`: the vLLM server's `CUDA_VISIBLE_DEVICES` when `device`
  names a GPU: GPUs N .. N+tensor_parallel_size-1. Empty (the server's environment unchanged) otherwise.
- Indices are the daemon's own: when the daemon itself runs with `CUDA_VISIBLE_DEVICES` (e.g. systemd), index N
  is the N-th GPU of that list, which is what the child's variable then names (CUDA's own semantics).
- `check_available(train_devices, device, tensor_parallel_size, gpu_count)` raises `ValueError` naming the key
  when a configured GPU does not exist on this machine (checked at start, where the GPU count is known).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
HINT = "give cuda:N, a GPU index N, or cpu"


def check_device(value: str) -> str:
    """The engine's `device`: `auto`, `cpu`, `cuda` or `cuda:N`. Raises ValueError otherwise."""
    value = value.strip().lower()
    if value == "auto":
        return value
    m = DEVICE_RE.match(value)
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"{value!r} is not a device: give auto, cpu, cuda or cuda:N")
    return value


def _train_device(item: Any) -> str:
    if isinstance(item, bool):
        raise ValueError(f"{item!r} is not a device: {HINT}")
    if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
        n = int(item)
        if n < 0:
            raise ValueError(f"{item!r} is not a GPU index: {HINT}")
        return f"cuda:{n}"
    if not isinstance(item, str):
        raise ValueError(f"{item!r} is not a device: {HINT}")
    value = item.strip().lower()
    m = DEVICE_RE.match(value)
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"{item!r} is not a device: {HINT}")
    if value == "cuda":
        raise ValueError("'cuda' does not say which GPU: give cuda:N or the index N")
    return value


def check_train_devices(items: Any) -> list[str]:
    """`train.devices` normalised to `cuda:N` / `cpu` strings. From the environment a comma-separated string
    (`SLOTH_TRAIN_DEVICES=0,1`) is accepted too. Raises ValueError on a bad entry, a repeated GPU, or GPUs mixed
    with cpu."""
    if isinstance(items, str):
        items = [x for x in (p.strip() for p in items.split(",")) if x]
    elif isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, list):
        raise ValueError(f"{items!r}: give a list of devices (cuda:N, a GPU index N, or cpu), e.g. [1] or [\"cuda:0\", \"cuda:1\"]")
    devices = [_train_device(x) for x in items]
    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"{devices}: GPUs and cpu do not mix in one update")
    gpus = [d for d in devices if d != "cpu"]
    if len(gpus) != len(set(gpus)):
        raise ValueError(f"{devices}: a GPU is named twice")
    return devices


def gpu_index(device: str) -> int | None:
    """N of `cuda:N`; 0 for a bare `cuda`; None for cpu/auto."""
    m = DEVICE_RE.match(device)
    if not m or m.group(1) != "cuda":
        return None
    return int(m.group(2) or 0)


def visible_devices(indices: list[int], environ: Mapping[str, str]) -> str:
    """`CUDA_VISIBLE_DEVICES` for a child that should see the daemon's GPUs `indices` (mapped through the daemon's
    own `CUDA_VISIBLE_DEVICES` when it has one). Raises ValueError for an index past the daemon's list."""
    parent = environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None or not parent.strip():
        return ",".join(str(i) for i in indices)
    own = [p.strip() for p in parent.split(",") if p.strip()]
    bad = [i for i in indices if i >= len(own)]
    if bad:
        raise ValueError(f"GPU {bad[0]} is not among the daemon's CUDA_VISIBLE_DEVICES={parent}")
    return ",".join(own[i] for i in indices)


@dataclass(frozen=True)
class TrainPlacement:
    """Where an update trains. `device`: what the job names inside each trainer process (`cpu`, `cuda` for a
    child that sees only its own GPUs, or the engine's `cuda:N` when it shares the engine's); `processes`: trainer
    processes (1 = single-process; more = torchrun + FSDP, one per device); `env`: added to the trainer's
    environment; `devices`: the configured devices (for logs and status)."""

    device: str
    processes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()


def train_placement(train_devices: list[str], device: str, environ: Mapping[str, str],
                    cuda_available: bool = False) -> TrainPlacement:
    """See the module docstring. `device` is the engine's (`auto` resolved with `cuda_available`)."""
    if not train_devices:
        resolved = ("cuda" if cuda_available else "cpu") if device == "auto" else device
        return TrainPlacement(device=resolved, devices=(resolved,))
    if train_devices[0] == "cpu":
        return TrainPlacement(device="cpu", processes=len(train_devices), devices=tuple(train_devices))
    indices = [int(d.split(":")[1]) for d in train_devices]
    return TrainPlacement(device="cuda", processes=len(indices), devices=tuple(train_devices),
                          env={"CUDA_VISIBLE_DEVICES": visible_devices(indices, environ)})


def serving_env(device: str, tensor_parallel_size: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The vLLM server's `CUDA_VISIBLE_DEVICES` (see the module docstring); {} when `device` names no GPU index."""
    if not DEVICE_RE.match(device) or ":" not in device or not device.startswith("cuda"):
        return {}
    first = gpu_index(device) or 0
    return {"CUDA_VISIBLE_DEVICES": visible_devices(list(range(first, first + tensor_parallel_size)), environ)}


def check_available(train_devices: list[str], device: str, tensor_parallel_size: int, gpu_count: int) -> None:
    """Raise ValueError naming the config key when a GPU it names is not on this machine (`gpu_count` GPUs)."""
    have = f"this machine has {gpu_count} GPU(s)" + (f" (0-{gpu_count - 1})" if gpu_count else "")
    index = gpu_index(device)
    if device.startswith("cuda") and index is not None and index + tensor_parallel_size > gpu_count:
        what = f"{device}" if tensor_parallel_size == 1 else \
            f"{device} with vllm.tensor_parallel_size={tensor_parallel_size}"
        raise ValueError(f"device: {what} needs GPUs up to {index + tensor_parallel_size - 1}, but {have}")
    for d in train_devices:
        i = gpu_index(d)
        if i is not None and i >= gpu_count:
            raise ValueError(f"train.devices: {d} is not on this machine: {have}")
