"""A real HTTP server on 127.0.0.1 for tests: an ASGI app under uvicorn in a thread.

Fakes of upstream APIs subclass `LocalServer` and implement `handle`. The server
runs its own event loop in a background thread, so what it sees (requests,
headers, a client that went away mid-stream) is what a remote server would see.
Everything it records is plain data that tests read from their own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn

__all__ = ["Exchange", "Failure", "LocalServer", "RecordedRequest", "wait_until"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when the body is not JSON


@dataclass(frozen=True)
class Failure:
    """A scripted one-shot response, usually an HTTP error (or a 200 with a bad body).

    ``body`` is sent as JSON unless it is a str (then as text/html).
    """

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Exchange:
    """One request and its response, with the client's disconnect tracked.

    After the request body is read, a watcher waits for ``http.disconnect``: it
    arrives when the client closes the connection before the response is over.
    """

    def __init__(self, server: LocalServer, scope: Scope, receive: Receive, send: Send) -> None:
        self._server = server
        self._scope = scope
        self._receive = receive
        self._send = send
        self.disconnected = asyncio.Event()
        self.complete = False
        self._watcher: asyncio.Task[None] | None = None
        self.request: RecordedRequest

    async def read(self) -> RecordedRequest:
        raw = b""
        while True:
            message = await self._receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        text = raw.decode("utf-8", "replace")
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = text
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._scope["headers"]
        }
        self.request = RecordedRequest(self._scope["method"], self._scope["path"], headers, body)
        self._watcher = asyncio.create_task(self._watch())
        return self.request

    async def respond(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, str):
            data, content_type = body.encode(), "text/html; charset=utf-8"
        else:
            data, content_type = json.dumps(body).encode(), "application/json"
        await self.start(status, content_type, headers)
        await self._send({"type": "http.response.body", "body": data, "more_body": False})
        self.complete = True

    async def start(
        self, status: int, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        raw = [(b"content-type", content_type.encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def write(self, data: bytes) -> bool:
        """Send a piece of a streamed body; False if the client is gone."""
        if self.disconnected.is_set():
            return False
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        return True

    async def write_split(self, data: bytes, *, split: bool) -> bool:
        """`write`, optionally as two halves with a pause so they arrive apart."""
        if not split:
            return await self.write(data)
        half = len(data) // 2
        return (
            await self.write(data[:half])
            and await self.pause(0.02)
            and await self.write(data[half:])
        )

    async def pause(self, seconds: float) -> bool:
        """Wait between pieces, but wake up at once if the client goes away."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), seconds)
        return not self.disconnected.is_set()

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.complete = True

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.complete:
                    self._server.disconnects.append(self.request)
                self.disconnected.set()
                return


class LocalServer:
    """Base of the fake upstreams: start/stop, the URL, and what was seen.

    Use as a context manager. ``requests`` holds every request in order;
    ``disconnects`` the requests whose client went away before the response
    ended. A handler that returns without ending a started response makes
    uvicorn drop the connection: that is how a fake cuts a stream short.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[RecordedRequest] = []
        self.active = 0  # exchanges in progress (touched only by the server's thread)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget what was seen, once the exchanges still running have ended.

        Waiting first keeps a stream that a previous test abandoned from
        reporting its disconnect into the next test's record.
        """
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        self.requests.clear()
        self.disconnects.clear()

    async def handle(self, exchange: Exchange) -> None:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        exchange = Exchange(self, scope, receive, send)
        self.active += 1
        try:
            self.requests.append(await exchange.read())
            await self.handle(exchange)
        finally:
            exchange.stop_watching()
            self.active -= 1

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            interface="asgi3",
            loop="asyncio",
            http="h11",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def wait_until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll ``condition`` from the test's loop until it holds; fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(0.01)
