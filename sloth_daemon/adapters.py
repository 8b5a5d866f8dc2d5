"""Adapter registry: immutable LoRA adapter versions on disk and the pointer to the one being served.

Layout under `<state>/adapters/`:
    v000001/            a peft adapter folder (adapter_config.json, adapter_model.safetensors) + sloth_adapter.json
    .staging-<hex>/     an adapter being written; never served; removed at start (a crash left it)
    CURRENT             the promoted version being served ("" or absent = base model)

Contract:
- `commit(staging)` turns a fully written staging folder into the next version atomically: files and folder are
  fsynced, then the folder is renamed to `vNNNNNN`. A version folder therefore either holds a complete adapter or
  does not exist. Weights are never rewritten; only `sloth_adapter.json` (status, metrics, reason) changes.
- `set_current` replaces CURRENT atomically (temp file, fsync, rename); only `promoted` versions that are not
  tainted can become current.
- Tainted (`tainted` holds the reason): trained on data a user asked to forget. The replay store's tainted_adapters
  table is the record; `mark_tainted` mirrors it here (idempotent, so start-up repairs a crash in between). A
  tainted version stays served only until a rebuild replaces it, is never served again, and can be removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from . import testhooks
from .durable import atomic_write_text, fsync_dir, fsync_tree

META_FILE = "sloth_adapter.json"
_VERSION_RE = re.compile(r"^v(\d{6})$")

AdapterStatus = Literal["candidate", "promoted", "rejected"]


class AdapterInfo(BaseModel):
    version: str
    parent: str | None = None
    created_at: str
    status: AdapterStatus = "candidate"
    update_id: int | None = None
    metrics: dict = {}
    reason: str | None = None
    tainted: str | None = None  # why it carries forgotten data; None = clean


class AdapterNotFound(LookupError):
    pass


def version_name(n: int) -> str:
    return f"v{n:06d}"


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- staging and commit -------------------------------------------------------------------------------------
    def cleanup_staging(self) -> list[str]:
        """Remove half-written adapters left by a crash. Returns the names removed."""
        removed = []
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        return removed

    def new_staging_dir(self) -> Path:
        p = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        p.mkdir()
        return p

    def _numbers(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir())

    def commit(self, staging: Path, *, parent: str | None, update_id: int | None, metrics: dict | None = None) -> AdapterInfo:
        if not (staging / "adapter_config.json").exists():
            raise ValueError(f"{staging} holds no adapter (adapter_config.json missing)")
        nums = self._numbers()
        version = version_name((nums[-1] if nums else 0) + 1)
        info = AdapterInfo(
            version=version,
            parent=parent,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            update_id=update_id,
            metrics=metrics or {},
        )
        (staging / META_FILE).write_text(info.model_dump_json(indent=2))
        fsync_tree(staging)
        testhooks.hold("adapter-commit")  # crash tests stop here: written, not yet published
        os.rename(staging, self.root / version)  # atomic publish; fails loudly if the name exists
        fsync_dir(self.root)
        return info

    # -- lookup ---------------------------------------------------------------------------------------------------
    def path(self, version: str) -> Path:
        p = self.root / version
        if not _VERSION_RE.match(version) or not (p / META_FILE).exists():
            raise AdapterNotFound(f"no adapter version {version!r}")
        return p

    def get(self, version: str) -> AdapterInfo:
        return AdapterInfo.model_validate_json((self.path(version) / META_FILE).read_text())

    def list(self) -> list[AdapterInfo]:
        out = []
        for n in self._numbers():
            meta = self.root / version_name(n) / META_FILE
            if meta.exists():
                out.append(AdapterInfo.model_validate_json(meta.read_text()))
        return out

    def update_meta(self, version: str, *, status: AdapterStatus | None = None, reason: str | None = None,
                    metrics: dict | None = None) -> AdapterInfo:
        info = self.get(version)
        changes = {k: v for k, v in {"status": status, "reason": reason, "metrics": metrics}.items() if v is not None}
        info = info.model_copy(update=changes)
        atomic_write_text(self.path(version) / META_FILE, info.model_dump_json(indent=2))
        return info

    def mark_tainted(self, tainted: dict[str, str]) -> list[str]:
        """Record {version: reason} of versions trained on forgotten data (versions not on disk are skipped);
        returns the versions newly marked."""
        marked = []
        for version, reason in tainted.items():
            try:
                info = self.get(version)
            except AdapterNotFound:
                continue
            if info.tainted is None:
                atomic_write_text(self.path(version) / META_FILE,
                                  info.model_copy(update={"tainted": reason}).model_dump_json(indent=2))
                marked.append(version)
        return marked

    def remove(self, version: str) -> None:
        """Delete a version that is not current and not promoted (retention), or tainted (forgetting). The folder is
        first renamed to a staging name, so a crash midway leaves a folder that start-up removes, never half a
        version. ValueError for a version that must stay."""
        info = self.get(version)
        if version == self.current():
            raise ValueError(f"{version} is being served; serve another version before removing it")
        if info.status == "promoted" and info.tainted is None:
            raise ValueError(f"{version} is promoted (it can be served again by a rollback); it is never deleted")
        doomed = self.root / f".staging-removed-{version}-{uuid.uuid4().hex[:6]}"
        os.rename(self.root / version, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    # -- the served pointer ---------------------------------------------------------------------------------------
    def current(self) -> str | None:
        f = self.root / "CURRENT"
        if not f.exists():
            return None
        v = f.read_text().strip()
        return v or None

    def set_current(self, version: str | None) -> None:
        if version is not None and self.get(version).status != "promoted":
            raise ValueError(f"{version} is not a promoted adapter")
        if version is not None and (why := self.get(version).tainted):
            raise ValueError(f"{version} was trained on forgotten data ({why}); it is not served again")
        atomic_write_text(self.root / "CURRENT", (version or "") + "\n")

    def to_json(self) -> list[dict]:
        cur = self.current()
        return [dict(json.loads(a.model_dump_json()), current=a.version == cur) for a in self.list()]
