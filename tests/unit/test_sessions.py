"""Background sessions, ``WS /ws`` fan-out and ``/ws/sessions``, over a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import ChatApp, fake_model
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatfleet.serving.api._events import Event, EventHub, event_frame
from chatfleet.serving.store import Store

MODELS = (
    fake_model("thinker", reply_tokens=8, thinking_tokens=5, tokens_per_second=200),
    fake_model("slow", reply_tokens=2000, tokens_per_second=100),
    fake_model("broken", reply_tokens=30, fail_after_tokens=10),
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[ChatApp, str]]:
    chat = ChatApp(Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db"), *MODELS)
    async with serving(chat.app) as url:
        yield chat, url


@pytest.fixture
async def client(server: tuple[ChatApp, str]) -> AsyncIterator[httpx.AsyncClient]:
    chat, url = server
    async with chat.http(url) as c:
        yield c


async def session_in(client: httpx.AsyncClient, session_id: str, *states: str) -> Any:
    async def probe() -> Any:
        body = (await client.get(f"/api/sessions/{session_id}")).json()
        return body if body["status"] in states else None

    return await wait_for(probe)


async def events_until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while not seen or seen[-1]["type"] != last:
            seen.append(json.loads(await ws.recv()))
    return seen


async def test_session_lifecycle(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/api/sessions", json={"message": "Think it over", "model": "thinker"}
    )
    assert created.status_code == 202, created.text
    session = created.json()
    assert (session["status"], session["message"], session["model"]) == (
        "pending",
        "Think it over",
        "thinker",
    )
    done = await session_in(client, session["id"], "completed")
    assert len(done["thinking"].split()) == 5
    assert len(done["response"].split()) == 8
    assert done["completion_tokens"] == 13
    assert done["started_at"] is not None
    assert done["finished_at"] is not None
    listed = (await client.get("/api/sessions")).json()["data"]
    assert [s["id"] for s in listed] == [session["id"]]
    assert (await client.get("/api/sessions", params={"status": "failed"})).json()["data"] == []

    conflict = await client.post(f"/api/sessions/{session['id']}/cancel")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    assert "already completed" in conflict.json()["error"]["message"]
    for missing in (
        await client.get("/api/sessions/nope"),
        await client.post("/api/sessions/nope/cancel"),
    ):
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
    bad = await client.post("/api/sessions", json={"message": "x", "model": "nope"})
    assert bad.status_code == 404


async def test_cancel_keeps_the_partial_response(
    server: tuple[ChatApp, str], client: httpx.AsyncClient
) -> None:
    chat, _ = server
    session = (await client.post("/api/sessions", json={"message": "Go", "model": "slow"})).json()
    await session_in(client, session["id"], "running")
    await asyncio.sleep(0.3)
    cancelled = await client.post(f"/api/sessions/{session['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled"
    assert 0 < len(body["response"].split()) < 2000
    assert chat.engines["slow"].cancelled
    again = await client.post(f"/api/sessions/{session['id']}/cancel")
    assert again.status_code == 409


async def test_engine_failure_fails_the_session(client: httpx.AsyncClient) -> None:
    session = (await client.post("/api/sessions", json={"message": "x", "model": "broken"})).json()
    failed = await session_in(client, session["id"], "failed")
    assert failed["error"] == "fake engine failure after 10 tokens"
    assert len(failed["response"].split()) == 10


async def test_events_fan_out_to_every_subscriber_in_order(
    server: tuple[ChatApp, str], client: httpx.AsyncClient
) -> None:
    _, url = server
    ws_url = url.replace("http://", "ws://") + "/ws"
    async with connect(ws_url) as first, connect(ws_url) as second:
        hellos = [json.loads(await ws.recv()) for ws in (first, second)]
        assert [h["type"] for h in hellos] == ["connected", "connected"]
        assert hellos[0]["subscriber_id"] != hellos[1]["subscriber_id"]
        counts = (await client.get("/ws/sessions")).json()
        assert counts["subscribers"] == 2

        # A malformed frame gets an error frame; the connection stays up.
        await second.send("not json")
        error = json.loads(await second.recv())
        assert (error["type"], error["code"]) == ("error", "invalid_frame")
        await second.send(json.dumps({"type": "ping"}))
        assert json.loads(await second.recv())["type"] == "pong"

        session = (
            await client.post("/api/sessions", json={"message": "Think", "model": "thinker"})
        ).json()
        streams = [await events_until(ws, "session.completed") for ws in (first, second)]

    assert [e["type"] for e in streams[0]] == [e["type"] for e in streams[1]]
    events = streams[0]
    assert all(e["session_id"] == session["id"] for e in events)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.created"
    assert kinds[-1] == "session.completed"
    thinking = [e for e in events if e["type"] == "llm.thinking"]
    response = [e for e in events if e["type"] == "llm.response"]
    # All thinking first (its last event closes it), then the response, then the end.
    assert kinds == (
        ["session.created"]
        + ["llm.thinking"] * len(thinking)
        + ["llm.response"] * len(response)
        + ["session.completed"]
    )
    assert [e["is_complete"] for e in thinking] == [False] * (len(thinking) - 1) + [True]
    assert thinking[-1]["content"] == "".join(e["delta"] for e in thinking[:-1])
    assert [(e["is_complete"], e["is_final"]) for e in response] == [(False, False)] * (
        len(response) - 1
    ) + [(True, True)]
    answer = "".join(e["delta"] for e in response[:-1])
    assert response[-1]["content"] == answer
    assert events[-1]["session"]["response"] == answer
    assert events[-1]["session"]["thinking"] == thinking[-1]["content"]
    assert (await client.get("/ws/sessions")).json()["subscribers"] == 0


async def test_shutdown_interrupts_running_sessions(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    chat = ChatApp(store, *MODELS)
    async with serving(chat.app) as url, chat.http(url) as client:
        session = (
            await client.post("/api/sessions", json={"message": "Go", "model": "slow"})
        ).json()
        await session_in(client, session["id"], "running")
    async with Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db") as reopened:
        stored = await reopened.get_session(session["id"])
    assert stored is not None
    assert stored.status == "interrupted"
    assert stored.error == "interrupted: the server is shutting down"
    assert stored.response  # what was said is kept


async def test_subscribers_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    chat = ChatApp(
        Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db"),
        *MODELS,
        websocket={"max_connections": 1},
    )
    async with serving(chat.app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as first, connect(ws_url) as second:
            assert json.loads(await first.recv())["type"] == "connected"
            refused = json.loads(await second.recv())
            assert (refused["type"], refused["code"]) == ("error", "overloaded")
            with pytest.raises(ConnectionClosed) as closed:
                await second.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013


def _event(type_: str, owner: str, session_id: str = "s", seq: int = 1, **flat: Any) -> Event:
    frame = event_frame(type_, session_id=session_id, seq=seq, **flat)
    return Event(frame, type_, owner, session_id, seq)


async def test_a_slow_subscriber_is_dropped_not_waited_for() -> None:
    hub = EventHub(queue_size=3)
    slow = hub.subscribe(lambda sid: f"hello {sid}", sees=None)
    fast = hub.subscribe(lambda sid: f"hello {sid}", sees="alice")
    received = [fast.queue.get_nowait()]
    for i in range(5):
        hub.deliver(_event("tick", "alice", seq=i + 1, n=i))
        item = fast.queue.get_nowait()
        assert isinstance(item, Event)
        received.append(item.frame)
    assert hub.count == 1
    assert hub.dropped == 1
    assert [json.loads(r)["data"]["n"] for r in received[1:]] == [0, 1, 2, 3, 4]
    frames = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert frames[-1] is None  # the sender closes the socket (1013) when it reads this
    assert len(frames) == 4


def test_a_subscriber_gets_only_its_clients_events_and_an_admin_all() -> None:
    hub = EventHub()
    alice = hub.subscribe(lambda sid: "hello", sees="alice")
    admin = hub.subscribe(lambda sid: "hello", sees=None)
    hub.deliver(_event("llm.response", "bob", "s1", delta="bob's secret"))
    hub.deliver(_event("llm.response", "alice", "s2", delta="alice's"))

    def frames(subscriber: Any) -> list[str]:
        out = [subscriber.queue.get_nowait() for _ in range(subscriber.queue.qsize())]
        return [json.loads(f.frame)["session_id"] for f in out[1:]]

    assert frames(alice) == ["s2"]
    assert frames(admin) == ["s1", "s2"]
