"""The CLI's data commands: `import FILE` (a dataset into the running daemon, over HTTP), `export VERSION DIR` and
`replay export FILE` (from the state directory's files; they work with the daemon stopped).

Contract:
- `run_import(path, call, fmt, skip_invalid, console)`: reads a JSONL file (or a JSON array, e.g. Alpaca's
  `alpaca_data.json`) and validates every row here first (`dataio.formats`), so a file with a bad row sends
  nothing unless `skip_invalid`; then sends the rows in batches of `BATCH_ROWS` to `POST /sloth/import` with a
  progress bar. Any other file (`.txt`, `.md`, ...) is one plain-text document (the daemon splits it to fit
  `train.max_seq_len`). Returns the totals. Raises `DataCommandError` (exit code 1) naming line and field.
- `run_export` / `run_replay_export`: see `dataio.exporter`.
The functions take the HTTP call and console from `cli.py` instead of importing it (no import cycle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .dataio.formats import RowError, parse_row, read_jsonl

BATCH_ROWS = 256
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataCommandError(RuntimeError):
    """A data command failed; the message says why (exit code 1)."""


def _rows(path: Path, text: str) -> list[tuple[int, Any]]:
    if text.lstrip().startswith("["):  # a JSON array file: "line" numbers are row numbers
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataCommandError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return list(enumerate(data, start=1))
    return list(read_jsonl(text))


def run_import(path: Path, call: Callable[..., Any], *, fmt: str, skip_invalid: bool, console: Console) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataCommandError(f"cannot read {path}: {e}") from None
    totals = {"rows": 0, "examples": 0, "added": 0, "duplicates": 0, "document_chunks": 0, "skipped": []}
    if path.suffix.lower() not in JSONL_SUFFIXES and fmt in ("auto", "text"):
        out = call("POST", "/sloth/import", json={"documents": [text]})
        return {**totals, **out}
    rows = _rows(path, text)
    errors, good = [], []
    for line, obj in rows:
        try:
            if isinstance(obj, RowError):
                raise obj
            parse_row(obj, fmt, line)
            good.append((line, obj))
        except RowError as e:
            errors.append(e)
    if errors and not skip_invalid:
        shown = "\n  ".join(str(e) for e in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataCommandError(f"{path}: {len(errors)} invalid row(s); nothing was imported "
                               f"(--skip-invalid imports the valid ones):\n  {shown}{more}")
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=len(good) <= BATCH_ROWS) as bar:
        task = bar.add_task("import", total=len(good))
        for start in range(0, len(good), BATCH_ROWS):
            batch = good[start:start + BATCH_ROWS]
            out = call("POST", "/sloth/import", json={"format": fmt, "rows": [o for _, o in batch],
                                                      "lines": [n for n, _ in batch]})
            for key in ("rows", "examples", "added", "duplicates", "document_chunks"):
                totals[key] += out[key]
            totals["pending_examples"] = out["pending_examples"]
            bar.advance(task, len(batch))
    totals["skipped"] = [e.to_json() for e in errors]
    return totals
