"""Two ingress replicas over one store (SQLite and PostgreSQL), each a real uvicorn server
in this process: every subscriber sees every session's events, a replica that stops
renewing its lease has only its own sessions interrupted, and resuming a session
(SSE or a ``resume`` frame on ``/ws``) delivers every event once, in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import ChatApp, fake_model
from websockets.asyncio.client import ClientConnection, connect

from chatfleet.serving.store import Store

MODELS = (
    fake_model("quick", reply_tokens=12, thinking_tokens=3, tokens_per_second=150),
    fake_model("slow", reply_tokens=400, tokens_per_second=40),
)
TERMINAL = {"session.completed", "session.failed", "session.cancelled", "session.interrupted"}
# Short leases, so that a stopped replica is found within the test.
LEASE = {"heartbeat_s": 0.5, "lease_s": 5.0, "events_poll_s": 0.1}


@dataclass
class Replica:
    chat: ChatApp
    url: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)


@pytest.fixture
async def replicas(store_url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    a = ChatApp(Store.from_url(store_url, **LEASE), *MODELS)
    b = ChatApp(Store.from_url(store_url, **LEASE), *MODELS)
    async with serving(a.app) as url_a, serving(b.app) as url_b:
        yield Replica(a, url_a), Replica(b, url_b)


async def collect(ws: ClientConnection, finished: int) -> list[dict[str, Any]]:
    """Session events until ``finished`` sessions have ended."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while sum(e["type"] in TERMINAL for e in seen) < finished:
            frame = json.loads(await ws.recv())
            if "seq" in frame:
                seen.append(frame)
    return seen


def by_session(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(event["session_id"], []).append(event)
    return out


def reply_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "llm.response" and not e["is_final"])


async def test_every_subscriber_sees_every_sessions_events(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with connect(a.ws_url) as on_a, connect(b.ws_url) as on_b:
        for ws in (on_a, on_b):
            assert json.loads(await ws.recv())["type"] == "connected"
        ids = []
        async with a.http() as http_a, b.http() as http_b:
            for i in range(6):
                http = http_a if i % 2 else http_b
                created = await http.post(
                    "/api/sessions", json={"message": f"q{i}", "model": "quick"}
                )
                assert created.status_code == 202, created.text
                ids.append(created.json()["id"])
            seen = [await collect(on_a, 6), await collect(on_b, 6)]
            stored = {i: (await http_a.get(f"/api/sessions/{i}")).json() for i in ids}

    for events in seen:
        sessions = by_session(events)
        assert set(sessions) == set(ids)
        for session_id, its in sessions.items():
            # Every event once, in order, with no gap, whichever replica ran it.
            assert [e["seq"] for e in its] == list(range(1, len(its) + 1)), [
                (e["seq"], e["type"]) for e in its
            ]
            assert its[0]["type"] == "session.created"
            assert its[-1]["type"] == "session.completed"
            assert reply_of(its) == stored[session_id]["response"] != ""


async def test_a_replica_that_stops_has_only_its_sessions_interrupted(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with connect(b.ws_url) as on_b, a.http() as http_a, b.http() as http_b:
        assert json.loads(await on_b.recv())["type"] == "connected"
        doomed = (await http_a.post("/api/sessions", json={"message": "x", "model": "slow"})).json()
        living = (await http_b.post("/api/sessions", json={"message": "y", "model": "slow"})).json()
        for http, session in ((http_a, doomed), (http_b, living)):
            await wait_for(lambda h=http, s=session: _status_is(h, s["id"], "running"), within=30)
        # A stops renewing its lease, as a replica that was killed would.
        runner_a = a.chat.app.state.sessions
        assert runner_a.lease is not None
        await runner_a.lease.close()

        seen = await collect(on_b, 1)
        interrupted = (await http_b.get(f"/api/sessions/{doomed['id']}")).json()
        still = (await http_b.get(f"/api/sessions/{living['id']}")).json()
        await http_b.post(f"/api/sessions/{living['id']}/cancel")

    assert seen[-1]["type"] == "session.interrupted"
    assert seen[-1]["session_id"] == doomed["id"]
    assert interrupted["status"] == "interrupted"
    assert "replica" in interrupted["error"]
    assert still["status"] == "running"


async def _status_is(http: httpx.AsyncClient, session_id: str, status: str) -> bool:
    return bool((await http.get(f"/api/sessions/{session_id}")).json()["status"] == status)


def sse_events(body: str) -> list[dict[str, Any]]:
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            event = json.loads(fields["data"])
            assert int(fields["id"]) == event["seq"] and fields["event"] == event["type"]
            out.append(event)
    return out


async def test_a_resumed_session_delivers_every_token_exactly_once(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.http() as http_a, b.http() as http_b, connect(b.ws_url) as first:
        assert json.loads(await first.recv())["type"] == "connected"
        session = (
            await http_a.post(
                "/api/sessions",
                json={"message": "go", "model": "slow", "max_tokens": 120},
            )
        ).json()
        # A client on replica B reads a few events, then loses its connection.
        before: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while len(before) < 5:
                frame = json.loads(await first.recv())
                if frame.get("session_id") == session["id"]:
                    before.append(frame)
        await first.close()
        after = before[-1]["seq"]

        # It resumes over SSE, through either replica, and over /ws.
        resumed_sse = await http_b.get(
            f"/api/sessions/{session['id']}/events", params={"after": after}
        )
        from_header = await http_a.get(
            f"/api/sessions/{session['id']}/events", headers={"Last-Event-ID": str(after)}
        )
        async with connect(a.ws_url) as second:
            assert json.loads(await second.recv())["type"] == "connected"
            await second.send(
                json.dumps({"type": "resume", "session_id": session["id"], "after": after})
            )
            resumed_ws = await collect(second, 1)
        stored = (await http_a.get(f"/api/sessions/{session['id']}")).json()

    assert resumed_sse.status_code == 200
    assert resumed_sse.headers["content-type"].startswith("text/event-stream")
    for resumed in (sse_events(resumed_sse.text), sse_events(from_header.text), resumed_ws):
        whole = before + [e for e in resumed if e["session_id"] == session["id"]]
        assert [e["seq"] for e in whole] == list(range(1, len(whole) + 1))
        assert whole[-1]["type"] == "session.completed"
        assert reply_of(whole) == stored["response"]
        assert len(stored["response"].split()) == 120


async def test_resuming_an_unknown_session_is_refused(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    async with a.http() as http:
        missing = await http.get("/api/sessions/nope/events")
        negative = await http.get("/api/sessions/nope/events", params={"after": -1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert negative.status_code == 400 and "error" in negative.json()
    async with connect(a.ws_url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "resume", "session_id": "nope", "after": 0}))
        refused = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "resume", "session_id": "nope", "after": "x"}))
        bad = json.loads(await ws.recv())
    assert (refused["type"], refused["data"]["code"]) == ("error", "not_found")
    assert (bad["type"], bad["data"]["code"]) == ("error", "invalid_frame")


async def test_a_session_cancelled_through_another_replica_stops_where_it_runs(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with a.http() as http_a, b.http() as http_b:
        session = (
            await http_a.post("/api/sessions", json={"message": "x", "model": "slow"})
        ).json()
        await wait_for(lambda: _status_is(http_a, session["id"], "running"), within=30)
        cancelled = await http_b.post(f"/api/sessions/{session['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        # Replica A hears of it through the store and stops generating.
        await wait_for(lambda: _runs_nothing(a), within=30)
        stored = (await http_a.get(f"/api/sessions/{session['id']}")).json()
        replayed = sse_events((await http_a.get(f"/api/sessions/{session['id']}/events")).text)
    assert stored["status"] == "cancelled"
    assert replayed[-1]["type"] == "session.cancelled"
    assert [e["seq"] for e in replayed] == sorted({e["seq"] for e in replayed})


async def _runs_nothing(replica: Replica) -> bool:
    return bool(replica.chat.app.state.sessions.active == 0)
