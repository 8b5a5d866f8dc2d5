"""Durable file writes: what the adapter registry and the built-in model use so a crash never leaves half a file.

Contract: `fsync_dir(path)` flushes a folder's entries (a rename or a new file in it is then on disk);
`fsync_tree(path)` flushes every file below `path` and then each folder; `atomic_write_text(path, text)` writes a
temp file beside `path`, fsyncs it, renames it over `path` and fsyncs the folder: readers see the old or the new
text, never a mix.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def _fsync(path) -> None:
    """fsync a file, or a folder's entries, by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync(path)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then each folder, so a later rename publishes durable content."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
