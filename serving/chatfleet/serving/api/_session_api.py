"""The session API: ``/api/sessions`` (and ``/api/alerts``), ``GET /ws/sessions``, and
``WS /ws`` and the resume stream wired to the `SessionRunner`; the events and their
shapes are described in `chatfleet.serving.api._sessions`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from chatfleet.serving.api._events import EventHub, add_events_socket
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._resume import add_resume_route
from chatfleet.serving.api._schemas import Limit, Offset
from chatfleet.serving.api._sessions import SessionRequest, SessionRunner
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.errors import NotFound
from chatfleet.serving.store import SessionStatus


def add_session_routes(
    app: FastAPI,
    gw: Gateway,
    *,
    max_concurrent: int = 8,
    max_waiting: int = 256,
    queue_size: int = 256,
) -> SessionRunner:
    """The session API and its live events; returns the runner (close it on shutdown)."""
    hub = EventHub(queue_size)
    runner = SessionRunner(gw, hub, max_concurrent=max_concurrent, max_waiting=max_waiting)
    app.state.sessions = runner

    @app.post(
        "/api/alerts",
        tags=["sessions"],
        status_code=202,
        summary="POST /api/sessions under the dashboard PoC's name.",
    )
    @app.post(
        "/api/sessions",
        tags=["sessions"],
        status_code=202,
        summary="Answer a message in the background; follow it on WS /ws.",
    )
    async def create_session(body: SessionRequest, caller: CallerDep) -> JSONResponse:
        session = await runner.create(body, caller.client_id)
        # session_id: the name the dashboard PoC's clients read (chatfleet's is id).
        return JSONResponse({**session.to_dict(), "session_id": session.id}, status_code=202)

    @app.get(
        "/api/sessions",
        tags=["sessions"],
        summary="The caller's sessions (an admin's: everyone's), newest first.",
    )
    async def list_sessions(
        caller: CallerDep,
        limit: Limit = 50,
        offset: Offset = 0,
        status: Annotated[
            SessionStatus | None, Query(description="Only sessions in this state.")
        ] = None,
    ) -> dict[str, Any]:
        found = await runner.store.list_sessions(
            owner=caller.sees, limit=limit, offset=offset, status=status
        )
        return {"object": "list", "data": [s.to_dict() for s in found]}

    @app.get("/api/sessions/{session_id}", tags=["sessions"], summary="One session.")
    async def get_session(session_id: str, caller: CallerDep) -> dict[str, Any]:
        found = await runner.store.get_session(session_id, owner=caller.sees)
        if found is None:
            raise NotFound(f"session {session_id!r} not found")
        return found.to_dict()

    @app.post(
        "/api/sessions/{session_id}/cancel",
        tags=["sessions"],
        summary="Cancel a session (409 if it has already finished).",
    )
    async def cancel_session(session_id: str, caller: CallerDep) -> dict[str, Any]:
        return (await runner.cancel(session_id, caller)).to_dict()

    @app.get(
        "/ws/sessions",
        tags=["sessions"],
        summary="Live counts of this replica: sessions and /ws subscribers.",
    )
    async def live_counts() -> dict[str, Any]:
        return {
            "subscribers": hub.count,
            "dropped_subscribers": hub.dropped,
            "sessions": {
                "running": runner.running,
                "waiting": runner.active - runner.running,
                "max_concurrent": runner.max_concurrent,
            },
            "events": {"written": runner.log.written, "followed": runner.log.followed},
            "recovered_sessions": runner.lease.recovered if runner.lease is not None else 0,
            "replica": gw.store.replica_id if gw.store is not None else None,
            "scope": "replica",
            "time": time.time(),
        }

    add_events_socket(app, gw, hub, lambda: runner.active, runner.log.replay)
    add_resume_route(app, runner.log, lambda: runner.store)

    return runner
