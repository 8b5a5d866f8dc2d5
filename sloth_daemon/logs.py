"""The daemon's log setup: `log_format = "text"` (one readable line per record, what journald shows) or `"json"`
(one JSON object per line: `time`, `level`, `logger`, `message`, plus `exc_info` with a traceback), for log
shippers (Loki, Vector, journald's JSON export) that want fields rather than text.

JSON records are written by `python-json-logger` (a maintained library), not by our own formatter. uvicorn's own
loggers are routed to the same root handler, so its lines come out in the same format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> dict[str, Any] | None:
    """Set the root logger's level and format. Returns the `log_config` to give uvicorn: None for JSON (uvicorn then
    adds no handlers of its own and its records reach the root handler), its default for text."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True
        return None
    import uvicorn.config

    return uvicorn.config.LOGGING_CONFIG
