"""`EventStream`: the body generator is closed promptly however the response ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from chatfleet.serving.api._streaming import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": "/"}


class Body:
    """An SSE body of ``events`` events, then ``hang`` (waiting for the next batch)."""

    def __init__(self, events: int, hang: bool = False) -> None:
        self.events, self.hang = events, hang
        self.closed = asyncio.Event()

    async def __call__(self) -> AsyncGenerator[str, None]:
        try:
            for i in range(self.events):
                yield f"data: {i}\n\n"
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed.set()


class Client:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


async def test_a_whole_body_goes_out_and_ends_the_response() -> None:
    body, client = Body(3), Client()
    await EventStream(body())(SCOPE, client.receive, client.send)
    assert client.bodies() == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert body.closed.is_set()


async def test_a_client_going_away_closes_the_body_and_the_response_returns() -> None:
    body, client = Body(1, hang=True), Client()
    response = asyncio.ensure_future(EventStream(body())(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.01)
    assert client.bodies() == [b"data: 0\n\n"] and not body.closed.is_set()
    client.gone.set()
    await asyncio.wait_for(response, 5)  # returns: the disconnect is no error
    assert body.closed.is_set()


async def test_cancelling_the_request_closes_the_body_and_stays_a_cancellation() -> None:
    # Ray Serve cancels the request's task when its client goes.
    body, client = Body(1, hang=True), Client()
    response = asyncio.ensure_future(EventStream(body())(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.01)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response
    assert body.closed.is_set()


async def test_a_body_stopped_while_its_event_is_sent_is_closed_too() -> None:
    # The generator is suspended at a yield (not at an await of its own) when stopped.
    body, client = Body(5), Client()
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        client.sent.append(message)
        if message["type"] == "http.response.body":
            client.gone.set()
            await stuck.wait()  # a slow client's socket

    await asyncio.wait_for(EventStream(body())(SCOPE, client.receive, send), 5)
    assert body.closed.is_set()
    assert len(client.bodies()) == 1
