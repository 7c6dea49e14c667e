"""WS /ws/chat against a real uvicorn server on 127.0.0.1, through the websockets client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine

KEY = "w" * 48
SECRET = "chat-secret"
CLIENT = {"client_id": "app", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest()}


def models() -> list[ModelConfig]:
    return [
        ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 20, "thinking_tokens": 4}),
        ModelConfig(
            name="slow", engine="fake", fake={"reply_tokens": 5000, "tokens_per_second": 200}
        ),
        ModelConfig(
            name="broken", engine="fake", fake={"reply_tokens": 30, "fail_after_tokens": 10}
        ),
    ]


class Server:
    """The app under uvicorn in this event loop, on a free port."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.auth = Authenticator(config.auth, KEY, MemoryRevocationStore())
        self.engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
        self.app = create_app(config, self.engines, metrics=self.metrics, auth=self.auth)
        self.token = self.auth.mint("app", ["chat"]).access_token

    async def __aenter__(self) -> Server:
        for engine in self.engines.values():
            await engine.start()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.base = f"127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await eventually(lambda: self.server.started)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task
        self.sock.close()

    def url(self, token: str | None = "default") -> str:
        token = self.token if token == "default" else token
        return f"ws://{self.base}/ws/chat" + (f"?token={token}" if token else "")

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def app_config(**fields: Any) -> AppConfig:
    # Rate limits have their own test; 50 clients share one client id here.
    auth = {"clients": [CLIENT], "rate_limit": {"requests_per_minute": 6000, "burst": 500}}
    return AppConfig(models=models(), auth=auth, **fields)


async def eventually(predicate: Callable[[], object], within_s: float = 10) -> None:
    for _ in range(int(within_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(app_config()) as s:
        yield s


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def chat(ws: ClientConnection, **frame: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send a chat; return its token frames and the final frame (complete or error)."""
    await ws.send(json.dumps({"type": "chat", "content": "Hello there", **frame}))
    tokens = []
    while True:
        msg = await recv(ws)
        if msg["type"] == "token":
            tokens.append(msg)
        elif msg["type"] in ("complete", "error"):
            return tokens, msg


async def test_ack_tokens_complete_and_the_conversation_continues(server: Server) -> None:
    async with connect(server.url()) as ws:
        ack = await recv(ws)
        assert ack["type"] == "connection_ack"
        assert ack["client_id"] == "app"
        assert len(ack["session_id"]) == 32
        tokens, done = await chat(ws, model="fake")
        assert done["type"] == "complete", done
        assert done["total_tokens"] == 24
        assert done["finish_reason"] == "stop"
        assert done["latency_ms"] >= 0
        assert {t["kind"] for t in tokens} == {"thinking", "text"}
        assert tokens[0]["kind"] == "thinking"  # reasoning first, kept apart
        answer = "".join(t["content"] for t in tokens if t["kind"] == "text")
        assert len(answer.split()) == 20
        # The default model; the connection keeps the conversation going.
        tokens, done = await chat(ws, max_tokens=5)
        assert done["type"] == "complete"
        assert done["model"] == "fake"


async def test_authorization_header_works_too(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    async with connect(server.url(None), additional_headers=headers) as ws:
        assert (await recv(ws))["type"] == "connection_ack"


async def test_malformed_frames_get_an_error_and_the_connection_stays(server: Server) -> None:
    big = json.dumps({"type": "chat", "content": "x" * 70_000})
    bad_frames: list[str | bytes] = [
        "not json",
        "[1, 2]",
        json.dumps({"type": "dance"}),
        json.dumps({"content": "no type"}),
        json.dumps({"type": "chat"}),
        json.dumps({"type": "chat", "content": ""}),
        json.dumps({"type": "chat", "content": "hi", "max_tokens": -1}),
        big,
        b"\x00binary",
    ]
    async with connect(server.url()) as ws:
        await recv(ws)
        codes = []
        for frame in bad_frames:
            await ws.send(frame)
            error = await recv(ws)
            assert error["type"] == "error", frame
            assert error["error"], frame
            codes.append(error["code"])
        assert codes[:4] == ["invalid_frame"] * 4
        assert codes[4:7] == ["invalid_request_error"] * 3
        assert codes[7] == "payload_too_large"
        # A bad model is an error frame too; then everything still works.
        _, error = await chat(ws, model="nope")
        assert error["code"] == "model_not_found"
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv(ws))["type"] == "pong"
        _, done = await chat(ws)
        assert done["type"] == "complete"


async def test_engine_failure_mid_stream_is_an_error_frame(server: Server) -> None:
    async with connect(server.url()) as ws:
        await recv(ws)
        tokens, error = await chat(ws, model="broken")
        assert tokens
        assert error["type"] == "error"
        assert error["code"] == "engine_error"
        _, done = await chat(ws, model="fake")
        assert done["type"] == "complete"


@pytest.mark.parametrize("kind", ["missing", "forged", "expired", "malformed", "revoked"])
async def test_bad_token_gets_an_error_frame_then_close_1008(server: Server, kind: str) -> None:
    token: str | None
    if kind == "missing":
        token = None
    elif kind == "forged":
        token = (
            Authenticator(server.config.auth, "f" * 48, MemoryRevocationStore())
            .mint("app", ["chat"])
            .access_token
        )
    elif kind == "expired":
        past = Authenticator(
            server.config.auth, KEY, MemoryRevocationStore(), clock=lambda: time.time() - 9999
        )
        token = past.mint("app", ["chat"]).access_token
    elif kind == "malformed":
        token = "abc.def"
    else:
        token = server.auth.mint("app", ["chat"]).access_token
        await server.auth.revoke(token)
    async with connect(server.url(token)) as ws:
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_token"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


@pytest.mark.parametrize("how", ["revoked", "expired"])
async def test_a_token_that_stops_holding_ends_the_connection_then(
    server: Server, how: str
) -> None:
    # Issued 898 s ago with a 900 s lifetime: expires within two seconds.
    assert server.config.auth.access_token_ttl_s == 900
    soon = Authenticator(
        server.config.auth, KEY, server.auth.revocations, clock=lambda: time.time() - 898
    )
    token = soon.mint("app", ["chat"]).access_token
    async with connect(server.url(token)) as ws:
        await recv(ws)
        # A chat is under way: the connection ends all the same, once the token stops holding.
        await ws.send(json.dumps({"type": "chat", "content": "long", "model": "slow"}))
        if how == "revoked":
            await recv(ws)  # the reply has started
            await server.auth.revoke(token)
        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):  # no chat frame needed: the server acts alone
                while True:
                    frames.append(json.loads(await ws.recv()))
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == [f"token_{how}"]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert how in closed.value.rcvd.reason


async def test_a_new_chat_while_streaming_is_refused_and_cancel_stops_it(server: Server) -> None:
    async with connect(server.url()) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "chat", "content": "long", "model": "slow"}))
        assert (await recv(ws))["type"] == "token"
        await ws.send(json.dumps({"type": "chat", "content": "another"}))
        while (frame := await recv(ws))["type"] == "token":
            pass
        assert frame["type"] == "error"
        assert frame["code"] == "busy"
        await ws.send(json.dumps({"type": "cancel"}))
        while (frame := await recv(ws))["type"] == "token":
            pass
        assert frame["type"] == "complete"
        assert frame["finish_reason"] == "cancelled"
        assert 0 < frame["total_tokens"] < 5000
    assert server.sample("chatfleet_generations_total", model="slow", finish_reason="cancelled")


async def test_client_disconnect_stops_the_generation(server: Server) -> None:
    async with connect(server.url()) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "chat", "content": "long", "model": "slow"}))
        assert (await recv(ws))["type"] == "token"
    await eventually(lambda: not server.sample("chatfleet_active_streams", model="slow"))
    assert server.sample("chatfleet_active_streams", model="slow") == 0
    assert server.sample("chatfleet_generations_total", model="slow", finish_reason="cancelled")
    await eventually(lambda: not server.sample("chatfleet_websocket_connections", endpoint="chat"))


async def test_heartbeat_drops_a_silent_peer_and_keeps_a_live_one() -> None:
    config = app_config(websocket={"ping_interval_s": 0.1, "pong_timeout_s": 0.2})
    async with (
        Server(config) as server,
        connect(server.url()) as silent,
        connect(server.url()) as live,
    ):
        await recv(silent)
        await recv(live)

        async def answer_pings() -> None:
            while True:
                if (await recv(live))["type"] == "ping":
                    await live.send(json.dumps({"type": "pong"}))

        responder = asyncio.create_task(answer_pings())
        assert (await recv(silent))["type"] == "ping"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(silent.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4408
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.5)  # a few more heartbeats
        assert not responder.done()
        responder.cancel()
        await asyncio.gather(responder, return_exceptions=True)
        _, done = await chat(live)
        assert done["type"] == "complete"


async def test_connection_limit_and_auth_off() -> None:
    config = AppConfig(models=models(), auth={"enabled": False}, websocket={"max_connections": 1})
    async with Server(config) as server, connect(server.url(None)) as first:
        assert (await recv(first))["client_id"] == "anonymous"
        async with connect(server.url(None)) as second:
            error = await recv(second)
            assert error["type"] == "error"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"http://{server.base}/ws/health")).json()
        assert (health["status"], health["connections"], health["max_connections"]) == (
            "full",
            1,
            1,
        )
        # The refused connection was never open.
        assert health["metrics"] == {
            "active_connections": 1,
            "total_connections": 1,
            "max_connections": 1,
        }


async def test_50_concurrent_chats(server: Server) -> None:
    n = 50
    connected, go = asyncio.Event(), asyncio.Event()
    acked = 0

    async def one(i: int) -> dict[str, Any]:
        nonlocal acked
        async with connect(server.url()) as ws:
            await recv(ws)
            acked += 1
            if acked == n:
                connected.set()
            await go.wait()
            tokens, done = await chat(ws, content=f"question {i}")
            assert done["type"] == "complete", done
            assert sum(len(t["content"].split()) for t in tokens) == 24
            return done

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(connected.wait(), 60)
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"http://{server.base}/ws/health",
            headers={"Authorization": f"Bearer {server.token}"},
        )
    assert r.json()["connections"] == n
    go.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert all(r["total_tokens"] == 24 for r in results)


async def test_chat_frames_are_rate_limited_per_client() -> None:
    config = AppConfig(
        models=models(),
        auth={"clients": [CLIENT], "rate_limit": {"requests_per_minute": 1, "burst": 2}},
    )
    async with Server(config) as server, connect(server.url()) as ws:  # 1st token
        await recv(ws)
        _, done = await chat(ws)  # 2nd token
        assert done["type"] == "complete"
        _, error = await chat(ws)
        assert error["code"] == "rate_limited"
        assert error["retry_after"] >= 1
        async with connect(server.url()) as refused:
            assert (await recv(refused))["code"] == "rate_limited"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(refused.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013


async def test_a_cancel_right_after_a_chat_reports_that_chat_not_the_one_before(
    server: Server,
) -> None:
    async with connect(server.url()) as ws:
        await recv(ws)
        _, first = await chat(ws)
        assert first["type"] == "complete" and first["total_tokens"] > 0
        # Back to back: the cancel can reach the server before the reply has started.
        await ws.send(json.dumps({"type": "chat", "content": "long", "model": "slow"}))
        await ws.send(json.dumps({"type": "cancel"}))
        while (frame := await recv(ws))["type"] == "token":
            pass
    assert frame["type"] == "complete" and frame["finish_reason"] == "cancelled"
    assert frame["model"] == "slow"
    assert frame["total_tokens"] < first["total_tokens"]
    assert frame["latency_ms"] < 5000
