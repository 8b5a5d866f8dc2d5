"""The status page's files: `GET /` is `sloth_daemon/page/index.html`, `GET /ui/<file>` its script and style.

The page has no build step and fetches nothing from the internet: plain HTML, CSS and one script (SVG plots drawn
by hand: a charting library would have to be vendored, and three line plots do not need one). It reads only the
public JSON API (`/sloth/status` every 2 s with `/sloth/interactions` and `/sloth/adapters`; `/sloth/updates` only
when status shows an update started or ended) and calls
`POST /sloth/updates` and `POST /sloth/adapters/rollback`, sending the API key the user typed into the page
(kept in the browser's localStorage). The files hold no data, so they are served without the key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).resolve().parent.parent / "page"


def mount_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    app.mount("/ui", StaticFiles(directory=PAGE_DIR), name="ui")
