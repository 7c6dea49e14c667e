"""``WS /ws/chat``: chat over one WebSocket (the protocol, frame by frame, is in
`chatfleet.serving.api._ws_protocol`), and ``GET /ws/health``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, WebSocket
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from chatfleet.serving.api._auth import (
    request_claims,
    ws_error_frame,
)
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._heartbeat import Heartbeats
from chatfleet.serving.api._loading import after_notice, opened_or_held
from chatfleet.serving.api._schemas import parse_json
from chatfleet.serving.api._ws_protocol import (
    BUSY,
    INVALID_FRAME,
    MAX_CONVERSATIONS,
    WS_PONG_TIMEOUT,
    ChatFrame,
    ws_close_code,
)
from chatfleet.serving.auth import Claims
from chatfleet.serving.errors import (
    AuthenticationError,
    ChatfleetError,
    Overloaded,
    PayloadTooLarge,
    RequestError,
)
from chatfleet.serving.protocol import Message
from chatfleet.serving.store import LOCAL_OWNER

__all__ = ["MAX_CONVERSATIONS", "ChatFrame", "add_chat_ws_routes", "ws_close_code"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Progress:
    """The streaming reply, as far as it got."""

    started: float
    model: str | None
    conversation_id: str
    tokens: int = 0


_PONG_MISSED = object()


class _PeerGone(Exception):
    """A send failed: the client is gone (the reader sees the disconnect too)."""


class _Connections:
    """This replica's /ws/chat connections: open now, and accepted since it started."""

    def __init__(self) -> None:
        self.open = 0
        self.total = 0


class _ChatConnection:
    def __init__(
        self, ws: WebSocket, gw: Gateway, claims: Claims | None, heartbeats: Heartbeats
    ) -> None:
        self.ws = ws
        self.gw = gw
        self.claims = claims
        self.client_id = claims.client_id if claims is not None else "anonymous"
        self.owner = claims.client_id if claims is not None else LOCAL_OWNER  # of its usage
        self.session_id = uuid.uuid4().hex
        self.settings = gw.config.websocket
        self.heartbeats = heartbeats
        # Conversation id -> its messages, least recently used first.
        self.histories: OrderedDict[str, list[Message]] = OrderedDict()
        self.generation: asyncio.Task[None] | None = None
        self.progress = _Progress(time.perf_counter(), None, self.session_id)
        self._send_lock = asyncio.Lock()
        # Why the connection ends: the reader ended (None), no pong (_PONG_MISSED), or
        # the error that ended its token. Set by whichever comes first.
        self._ended: asyncio.Future[object] | None = None
        self._pings: set[asyncio.Task[None]] = set()

    async def send(self, text: str) -> None:
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                raise _PeerGone from exc

    async def send_frame(self, frame_type: str, **fields: Any) -> None:
        await self.send(json.dumps({"type": frame_type, **fields}))

    async def send_error(self, exc: ChatfleetError, **extra: Any) -> None:
        if exc.retry_after is not None:
            extra.setdefault("retry_after", exc.retry_after)
        await self.send_error_frame(exc.message, exc.code, **extra)

    async def send_error_frame(self, message: str, code: str, **extra: Any) -> None:
        self.gw.metrics.errors.labels(code).inc()
        await self.send(ws_error_frame(message, code, **extra))

    async def run(self) -> None:
        await self.send_frame(
            "connection_ack",
            client_id=self.client_id,
            session_id=self.session_id,
            ping_interval_s=self.settings.ping_interval_s,
            max_message_bytes=self.settings.max_message_bytes,
        )
        # One task per socket (the reader); the heartbeat and the token's end are
        # callbacks of this replica's `Heartbeats` and `TokenWatch`.
        self._ended = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self.read_frames())
        reader.add_done_callback(lambda _: self._end(None))
        auth, claims = self.gw.auth, self.claims
        stop_watch = None
        try:
            self.heartbeats.add(self)
            if claims is not None and auth is not None:
                stop_watch = auth.when_invalid(claims, self._end)
            ending = await self._ended
        finally:
            self.heartbeats.remove(self)
            if stop_watch is not None:
                stop_watch()
            tasks = [t for t in (reader, self.generation, *self._pings) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if ending is _PONG_MISSED:
            logger.info("ws/chat %s: no pong in time; closing", self.session_id)
            await self.close(WS_PONG_TIMEOUT, "pong timeout")
        elif isinstance(ending, AuthenticationError):
            with contextlib.suppress(_PeerGone):
                await self.send_error(ending)
            await self.close(ws_close_code(ending), ending.message)
        elif not reader.cancelled() and reader.exception() is not None:
            logger.debug("ws/chat %s ended: %r", self.session_id, reader.exception())

    def _end(self, why: object) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(why)

    def ping(self) -> None:
        """`Heartbeats`: send a ping (in a task of its own: a slow peer holds no one up)."""
        task = asyncio.create_task(self._ping())
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)

    async def _ping(self) -> None:
        with contextlib.suppress(_PeerGone):  # the reader sees the disconnect
            await self.send_frame("ping", timestamp=time.time())

    def pong_missed(self) -> None:
        self._end(_PONG_MISSED)

    async def close(self, code: int, reason: str) -> None:
        if (
            self.ws.application_state == WebSocketState.CONNECTED
            and self.ws.client_state == WebSocketState.CONNECTED
        ):
            try:
                await self.ws.close(code, reason)
            except Exception:
                logger.debug("close of a gone WebSocket failed", exc_info=True)

    async def read_frames(self) -> None:
        limit = self.settings.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.send_error(RequestError("binary frames are not accepted"))
                continue
            if len(text) > limit or len(text.encode()) > limit:
                await self.send_error(PayloadTooLarge(f"frame exceeds {limit} bytes"))
                continue
            try:
                data = parse_json(text)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                await self.send_error_frame("frame is not a JSON object", INVALID_FRAME)
                continue
            kind = data.get("type")
            if kind == "pong":
                self.heartbeats.pong(self)
            elif kind == "ping":
                echoed = data.get("timestamp")
                await self.send_frame("pong", timestamp=time.time() if echoed is None else echoed)
            elif kind == "chat":
                if not await self.still_authorized():
                    return
                await self.start_chat(data)
            elif kind == "cancel":
                await self.cancel_chat()
            else:
                await self.send_error_frame(
                    f"unknown frame type {kind!r} (expected chat, cancel, ping or pong)",
                    INVALID_FRAME,
                )

    async def still_authorized(self) -> bool:
        """The connection's token must still hold at each chat; else error, close 1008."""
        if self.claims is None or self.gw.auth is None:
            return True
        try:
            await self.gw.auth.ensure_current(self.claims)
        except AuthenticationError as exc:
            await self.send_error(exc)
            await self.close(ws_close_code(exc), exc.message)
            return False
        return True

    async def start_chat(self, data: dict[str, Any]) -> None:
        if self.generation is not None and not self.generation.done():
            await self.send_error_frame(
                'a reply is still streaming; send {"type": "cancel"} first', BUSY
            )
            return
        try:
            frame = ChatFrame.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            await self.send_error(RequestError(f"{param}: {first.get('msg')}", param=param))
            return
        if self.gw.auth is not None:
            wait = self.gw.auth.retry_after(self.client_id)
            if wait > 0:
                await self.send_error(
                    Overloaded("rate limit exceeded"), retry_after=max(1, math.ceil(wait))
                )
                return
        # The reply's progress starts now, not when its task first runs: a cancel that
        # arrives before then must report this chat, not the one before.
        self.progress = _Progress(
            time.perf_counter(),
            frame.model or self.gw.config.default_model_name,
            frame.conversation_id or self.session_id,
        )
        self.generation = asyncio.create_task(self.generate(frame, self.progress))

    async def cancel_chat(self) -> None:
        task = self.generation
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        p = self.progress
        await self.send_frame(
            "complete",
            conversation_id=p.conversation_id,
            total_tokens=p.tokens,
            latency_ms=round((time.perf_counter() - p.started) * 1000, 1),
            finish_reason="cancelled",
            model=p.model,
        )

    async def generate(self, frame: ChatFrame, progress: _Progress) -> None:
        # One trace per chat message (the connection itself has no span: it lives for hours).
        with (
            self.gw.tracer.start_as_current_span(
                "WS /ws/chat chat",
                kind=SpanKind.SERVER,
                attributes={"http.route": "/ws/chat"},
                record_exception=False,
                set_status_on_exception=False,
            ),
            contextlib.suppress(_PeerGone),  # nobody to tell; the reader ends the connection
        ):
            await self.reply(frame, progress)

    async def reply(self, frame: ChatFrame, progress: _Progress) -> None:
        gw = self.gw
        started = progress.started
        conversation = progress.conversation_id
        question = Message(role="user", content=frame.content)
        messages = [*self.histories.get(conversation, ()), question]
        if frame.system:
            messages.insert(0, Message(role="system", content=frame.system))
        try:
            opened = await opened_or_held(
                True,
                gw.open,
                frame.model,
                messages,
                frame,
                conversation_id=conversation,
                owner=self.owner,
                accepted_at=started,
            )
            answer = await after_notice(
                opened,
                lambda model: self.send_frame("loading", model=model, conversation_id=conversation),
            )
            progress.model = answer.model
            async for delta in answer.deltas():
                progress.tokens = answer.tokens
                # One frame per run of same-kind chunks in a batch: fewer, larger frames.
                runs: list[tuple[str, list[str]]] = []
                for chunk in delta.chunks:
                    if not chunk.text:
                        continue
                    if runs and runs[-1][0] == chunk.kind:
                        runs[-1][1].append(chunk.text)
                    else:
                        runs.append((chunk.kind, [chunk.text]))
                for kind, texts in runs:
                    text = "".join(texts)
                    await self.send_frame(
                        "token", content=text, token=text, kind=kind, conversation_id=conversation
                    )
        except _PeerGone:
            raise
        except ChatfleetError as exc:
            await self.send_error(exc, conversation_id=conversation)
            return
        except Exception:
            logger.exception("ws/chat %s: generation failed", self.session_id)
            await self.send_error(ChatfleetError("generation failed"), conversation_id=conversation)
            return
        self.remember(conversation, question, answer.content)
        await self.send_frame(
            "complete",
            conversation_id=conversation,
            total_tokens=answer.tokens,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            finish_reason=answer.finish,
            model=answer.model,
        )

    def remember(self, conversation: str, question: Message, answer: str) -> None:
        history = self.histories.pop(conversation, [])
        history += [question, Message(role="assistant", content=answer)]
        # Leave room for a system prompt and the next question.
        keep = max(0, self.gw.config.server.max_messages - 2)
        if len(history) > keep:
            del history[: len(history) - keep]
        self.histories[conversation] = history  # now the most recently used
        while len(self.histories) > MAX_CONVERSATIONS:
            self.histories.popitem(last=False)


def add_chat_ws_routes(app: FastAPI, gw: Gateway) -> None:
    """``WS /ws/chat`` and ``GET /ws/health``."""
    connections = _Connections()
    heartbeats = Heartbeats(gw.config.websocket.ping_interval_s, gw.config.websocket.pong_timeout_s)
    gauge = gw.metrics.websocket_connections.labels("chat")
    settings = gw.config.websocket

    @app.websocket("/ws/chat")
    async def ws_chat(ws: WebSocket) -> None:
        if connections.open >= settings.max_connections:
            await ws.accept()
            exc = Overloaded(f"too many connections (limit {settings.max_connections})")
            gw.metrics.errors.labels(exc.code).inc()
            await ws.send_text(ws_error_frame(exc.message, exc.code))
            await ws.close(ws_close_code(exc), "too many connections")
            return
        connections.open += 1
        connections.total += 1
        gauge.inc()
        try:
            await ws.accept()
            with contextlib.suppress(_PeerGone):
                await _ChatConnection(ws, gw, request_claims(ws), heartbeats).run()
        finally:
            connections.open -= 1
            gauge.dec()

    @app.get(
        "/ws/health",
        tags=["health"],
        summary="WebSocket chat connections of this replica, and its models' state.",
    )
    async def ws_health() -> dict[str, Any]:
        states = await gw.model_states()
        return {
            "status": "ok" if connections.open < settings.max_connections else "full",
            "service": "chatfleet-ws-chat",
            "connections": connections.open,
            "max_connections": settings.max_connections,
            "metrics": {
                "active_connections": connections.open,
                "total_connections": connections.total,
                "max_connections": settings.max_connections,
            },
            # What the chat gateway reported of its Ollama backend: here, every model.
            "backend": {
                "status": "ok" if all(s == "ready" for s in states.values()) else "degraded",
                "models": states,
            },
        }
