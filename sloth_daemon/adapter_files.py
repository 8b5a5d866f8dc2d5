"""A promoted adapter's files, served to a vLLM on another host (no shared disk).

The `sloth-vllm-resolver` plugin (`vllm_resolver/`, installed into the remote vLLM's venv) resolves each adapter
name the daemon asks vLLM for by fetching the version's files over HTTP (`GET /sloth/adapters/{version}/files` and
`.../files/{name}`, with the daemon's API key) into the vLLM host's own cache folder. This module says which files
those are and what they hash to.

Contract:
- `manifest(registry, version)` -> `{"version": str, "digest": str, "files": [{"name", "bytes", "sha256"}]}`:
  every regular file of the version's folder except the registry's own `sloth_adapter.json` (peft's
  `adapter_config.json`, `adapter_model.safetensors`, ...), sorted by name; `bytes` in bytes, `sha256` hex;
  `digest` is the sha256 of the `name:sha256` lines, so a cache keyed by it never mixes two daemons' same-named
  versions. Hashes are computed once per version (a file's size and mtime key the cache) in the caller's thread:
  call it off the event loop.
- `file_path(registry, version, name)` -> the `Path` of one of those files.
- Both raise `AdapterNotFound` for an unknown version, one that was never promoted (candidates and rejected ones
  are not served), or a name that is not one of its files (no path is ever built from a name that is not listed).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from .adapters import META_FILE, AdapterNotFound, AdapterRegistry

_CHUNK = 1 << 20
_cache: dict[tuple, dict] = {}
_lock = threading.Lock()


def _served_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.name != META_FILE
                   and not p.name.startswith(".")), key=lambda p: p.name)


def _promoted_folder(registry: AdapterRegistry, version: str) -> Path:
    folder = registry.path(version)  # AdapterNotFound for a malformed or unknown version
    if registry.get(version).status != "promoted":
        raise AdapterNotFound(f"adapter version {version!r} was never promoted; only promoted versions are served")
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(registry: AdapterRegistry, version: str) -> dict:
    """The files a remote vLLM fetches for `version` (see the module docstring)."""
    folder = _promoted_folder(registry, version)
    files = _served_files(folder)
    key = (str(folder), tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files))
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    entries = [{"name": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files]
    digest = hashlib.sha256("".join(f"{e['name']}:{e['sha256']}\n" for e in entries).encode()).hexdigest()
    result = {"version": version, "digest": digest, "files": entries}
    with _lock:
        _cache[key] = result
    return result


def file_path(registry: AdapterRegistry, version: str, name: str) -> Path:
    """One of `version`'s served files, by name (see the module docstring)."""
    folder = _promoted_folder(registry, version)
    for p in _served_files(folder):
        if p.name == name:
            return p
    raise AdapterNotFound(f"adapter version {version} has no file {name!r}")
