"""The browser dashboard: ``GET /`` and ``/static/*`` (plain files shipped in the package).

The page is static; everything live comes from the public API with the
caller's token (``Authorization: Bearer`` on fetches, ``?token=`` on ``WS /ws``):
the playground streams ``/v1/chat/completions`` and shows each answer's route,
classify and compress call ``/api/classify`` and ``/api/compress``, sessions come
from ``/api/sessions`` and ``WS /ws``, and the live figures per model are computed
in the browser from scrapes of ``GET /metrics`` (what Prometheus reads, so the page
and a Grafana panel agree, and no second API has to follow the registry).
Both paths are public in the auth middleware, so a browser can load the page
before it has a token; the page then asks for one, or takes it from the URL
fragment (``/#token=...``, which never reaches the server or its logs).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

__all__ = ["STATIC_DIR", "add_dashboard_routes"]

STATIC_DIR = Path(__file__).with_name("static")
# The files change with the package version; make browsers revalidate them.
_REVALIDATE = {"Cache-Control": "no-cache"}


class _StaticFiles(StaticFiles):
    """Static files that browsers revalidate (ETag) instead of caching blindly."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_REVALIDATE)
        return response


def add_dashboard_routes(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` and its assets under ``/static/``."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers=_REVALIDATE)

    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
