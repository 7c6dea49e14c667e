"""Clients that read a stream to its very end, for the tests of how streams end (a drain,
a shutdown): what the last events or frames were, and how the socket closed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def sse_events(body: str) -> list[tuple[str | None, Any]]:
    """``(event, data)`` per SSE event; data parsed as JSON, except OpenAI's ``[DONE]``."""
    events: list[tuple[str | None, Any]] = []
    for block in body.strip().split("\n\n"):
        event, data = None, ""
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((event, data if data == "[DONE]" else json.loads(data)))
    return events


async def ws_chat_frames(
    url: str, started: asyncio.Event, model: str = "slow"
) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame of one ``/ws/chat`` chat until the server closes, and its close code;
    ``started`` is set at the first token."""
    frames: list[dict[str, Any]] = []
    async with connect(url.replace("http://", "ws://") + "/ws/chat") as ws:
        await ws.recv()  # connection_ack
        await ws.send(json.dumps({"type": "chat", "content": "Hello", "model": model}))
        try:
            async for raw in ws:
                frames.append(json.loads(raw))
                if frames[-1]["type"] == "token":
                    started.set()
        except ConnectionClosed:
            pass
        return frames, ws.close_code
