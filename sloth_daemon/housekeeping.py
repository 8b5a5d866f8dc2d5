"""Retention: what old state is deleted, so a daemon that runs for months does not fill its disk.

Contract: `prune(runs_dir, registry, keep_last)` keeps
- the run folders (`runs/update-NNNNNN/`: job file, trainer log) of the `keep_last` newest updates and of every
  update whose adapter was promoted, and deletes the others;
- every promoted adapter version, the one being served, every candidate (one may be mid-swap), and the rejected
  versions among the `keep_last` newest versions; older rejected versions are deleted.
Update rows in the replay store (metrics, verdicts, reasons) are never deleted, so history stays complete. Deleting
never raises: a failure is logged and the next prune tries again. It runs after each update and at start (never
while an update trains).

The job files kept lose the examples' text (`strip_job_texts`): the trainer needs it while it runs, the record
afterwards needs only the ids, and a text that was forgotten on request (`sloth-daemon forget`) must not live on in
an old run folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from .adapters import AdapterRegistry

log = logging.getLogger(__name__)

_RUN_RE = re.compile(r"^update-(\d+)$")


def prune(runs_dir: Path, registry: AdapterRegistry, keep_last: int) -> dict[str, list[str]]:
    """Apply the retention rule; returns what was deleted: {"runs": [folder names], "adapters": [versions]}."""
    removed: dict[str, list[str]] = {"runs": [], "adapters": []}
    try:
        infos = registry.list()
        current = registry.current()
        promoted_updates = {i.update_id for i in infos if i.status == "promoted" and i.update_id is not None}
        newest = {i.version for i in infos[-keep_last:]}
        for info in infos:
            if info.status == "rejected" and info.version not in newest and info.version != current:
                registry.remove(info.version)
                removed["adapters"].append(info.version)
        runs = sorted((int(m.group(1)), p) for p in runs_dir.glob("update-*") if (m := _RUN_RE.match(p.name)))
        recent = {n for n, _ in runs[-keep_last:]}
        for n, path in runs:
            if n not in recent and n not in promoted_updates:
                shutil.rmtree(path)
                removed["runs"].append(path.name)
    except OSError as e:
        log.warning("retention: could not delete old state (%s); will try again after the next update", e)
    strip_job_texts(runs_dir)
    if removed["runs"] or removed["adapters"]:
        log.info("retention (keep_last=%d): deleted %d run folder(s) and rejected adapter(s) %s", keep_last,
                 len(removed["runs"]), ", ".join(removed["adapters"]) or "none")
    return removed


def strip_job_texts(runs_dir: Path) -> list[str]:
    """Rewrite each finished run's `job.json` without its `examples` (the batches and eval sets keep their ids);
    returns the run folders changed. Call only while no update trains (its trainer may still read its job)."""
    changed = []
    for job_file in sorted(runs_dir.glob("update-*/job.json")):
        try:
            job = json.loads(job_file.read_text())
            if not isinstance(job, dict) or not job.get("examples"):
                continue
            job["examples"] = {}
            tmp = job_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(job))
            tmp.replace(job_file)
            changed.append(job_file.parent.name)
        except (OSError, ValueError) as e:
            log.warning("retention: could not strip the example texts from %s (%s)", job_file, e)
    return changed
