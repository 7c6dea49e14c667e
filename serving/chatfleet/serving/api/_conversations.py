"""Stored conversations: ``POST /v1/messages`` with the history kept server-side.

A turn is stored whole or not at all. Once the engine has started (its first token
is ready), one transaction stores the user's messages and the assistant's message
(status ``partial``); that one is checkpointed while it streams, and finished as
``complete``, ``cancelled`` (the client went away) or ``failed`` (the engine failed),
with whatever text was produced. So a disconnect or an engine crash loses nothing
that was already said. When the engine cannot start, the user's messages are stored
with a ``failed`` assistant message whose ``error`` says why; a request refused as
invalid (4xx, even when that is only found out after routing) stores nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, field_validator

from chatfleet.serving.api._answers import (
    Answer,
    BackgroundWrites,
    Delta,
    best_effort,
    require_store,
)
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._schemas import Ask, ChatMessage, Limit, Offset, SamplingFields
from chatfleet.serving.api._streaming import EventStream, sse
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.api._tool_schemas import ToolFields
from chatfleet.serving.api._wire import (
    route_headers,
    tool_call_delta,
    tool_call_dict,
    tool_call_from_dict,
)
from chatfleet.serving.errors import ChatfleetError, NotFound, RequestError, ShuttingDown
from chatfleet.serving.protocol import Message
from chatfleet.serving.store import MessageStatus, Store

logger = logging.getLogger(__name__)

_TITLE_CHARS = 80


class MessagesRequest(ToolFields, SamplingFields):
    """`POST /v1/messages`: new messages for a stored conversation (or a new one).

    Fields chatfleet has no use for are accepted and ignored. Tools and
    ``response_format`` are OpenAI's; the assistant's tool calls and the tools' results
    (``tool`` messages with their ``tool_call_id``) are stored in the conversation.
    """

    model_config = ConfigDict(extra="ignore")

    conversation_id: str | None = Field(
        None,
        max_length=64,
        description='A stored conversation to continue; absent, null or "" starts a new one.',
    )
    messages: list[ChatMessage] = Field(
        min_length=1, description="The new messages (usually one user message)."
    )
    model: str | None = Field(
        None,
        description="Model name; empty means the default model, 'auto' lets the router choose"
        " (the conversation keeps its model unless a new topic clearly wins).",
    )
    stream: bool = Field(False, strict=True, description="Stream the answer as server-sent events.")

    @field_validator("conversation_id", mode="before")
    @classmethod
    def _empty_is_new(cls, value: object) -> object:
        # The orchestrator's clients send "" for "start a new conversation".
        return None if value == "" else value

    def asks(self) -> list[Ask]:
        return [*super().asks(), *self.tool_asks(self.messages)]


def _title(messages: list[Message]) -> str | None:
    first = next((m.content for m in messages if m.role == "user" and m.content.strip()), None)
    if first is None:
        return None
    first = " ".join(first.split())
    return first if len(first) <= _TITLE_CHARS else first[: _TITLE_CHARS - 1] + "…"


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Turn:
    """One assistant answer: streamed from the engine into the store."""

    def __init__(
        self,
        gw: Gateway,
        store: Store,
        writes: BackgroundWrites,
        owner: str,
        conversation_id: str,
        message_id: int,
        answer: Answer,
    ) -> None:
        self.gw = gw
        self.store = store
        self.writes = writes
        self.owner = owner
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.answer = answer
        self.model = answer.model
        self.route = answer.route

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """The answer's deltas; the stored message is finished however this ends."""
        status: MessageStatus = "cancelled"  # unless the stream ends or fails
        error: str | None = None
        try:
            async for delta in self.answer.deltas():
                if self.answer.checkpoint_due():
                    await best_effort(self._checkpoint, "checkpoint of a partial answer")
                yield delta
            status = "complete"
        except ShuttingDown as exc:
            status, error = "interrupted", exc.message
            raise
        except ChatfleetError as exc:
            status, error = "failed", exc.message
            raise
        except Exception:
            status, error = "failed", "generation failed"
            raise
        finally:
            await self.answer.aclose()
            await self.finish(status, error)

    async def _checkpoint(self) -> None:
        await self.store.update_message(
            self.message_id, content=self.answer.content, thinking=self.answer.reasoning
        )

    async def finish(self, status: MessageStatus, error: str | None) -> None:
        usage = self.answer.final_usage()

        async def write() -> None:
            await self.store.finish_message(
                self.message_id,
                status=status,
                content=self.answer.content,
                thinking=self.answer.reasoning,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                error=error,
                tool_calls=[tool_call_dict(c) for c in self.answer.tool_calls],
            )
            await best_effort(
                lambda: self.store.add_log(
                    "message.finished",
                    owner=self.owner,
                    level="info" if status == "complete" else "warning",
                    conversation_id=self.conversation_id,
                    data={
                        "message_id": self.message_id,
                        "status": status,
                        "model": self.model,
                        "completion_tokens": usage.completion_tokens,
                        "error": error,
                    },
                ),
                "log of a finished message",
            )

        try:
            await self.writes.settle(write())
        except Exception:
            logger.exception(
                "could not store the %s answer of conversation %s", status, self.conversation_id
            )

    def result(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "model": self.model,
            "reply": self.answer.content,
            "finish_reason": self.answer.finish,
            "usage": self.answer.usage_dict(),
        }
        if self.answer.thinking:
            body["thinking"] = self.answer.reasoning
        if self.answer.calls:
            body["tool_calls"] = [tool_call_dict(c) for c in self.answer.tool_calls]
        if self.route is not None:
            body["route"] = self.route
        return body

    async def collect(self, request: Request) -> None:
        """Consume the whole answer; stop it (stored as cancelled) if the client goes away."""

        async def consume() -> None:
            async with contextlib.aclosing(self.deltas()) as deltas:
                async for _ in deltas:
                    pass

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consumer, watcher):
                task.cancel()
            await asyncio.gather(consumer, watcher, return_exceptions=True)
        if not consumer.cancelled():
            consumer.result()  # engine errors surface here

    async def events(self) -> AsyncGenerator[str, None]:
        metadata: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "model": self.model,
        }
        if self.route is not None:
            metadata["route"] = self.route
        yield sse(metadata, "metadata")
        try:
            async with contextlib.aclosing(self.deltas()) as deltas:
                async for delta in deltas:
                    if delta.thinking:
                        yield sse({"text": delta.thinking}, "thinking_chunk")
                    if delta.text:
                        yield sse({"text": delta.text}, "text_chunk")
                    for chunk in delta.chunks:
                        if chunk.call is not None:
                            yield sse(tool_call_delta(chunk.call), "tool_call_chunk")
        except Exception as exc:
            yield sse(self.gw.error_event(exc), "error")
            self.answer.finish_reason = "interrupted" if isinstance(exc, ShuttingDown) else "error"
        yield sse(
            {
                "conversation_id": self.conversation_id,
                "message_id": self.message_id,
                "finish_reason": self.answer.finish,
                "usage": self.answer.usage_dict(),
            },
            "end_stream",
        )


def add_conversation_routes(app: FastAPI, gw: Gateway) -> BackgroundWrites:
    """``POST /v1/messages`` and ``/v1/conversations``; returns the writes to drain on shutdown."""
    writes = BackgroundWrites()

    @app.post(
        "/v1/messages",
        tags=["conversations"],
        summary="Continue a stored conversation (history prepended server-side).",
        description=(
            "Returns {conversation_id, message_id, reply, thinking?, model, route?,"
            " finish_reason, usage}. With `stream: true`, server-sent events: `metadata`"
            " {conversation_id, message_id, model, route?}; `thinking_chunk` and `text_chunk`"
            " {text}; `tool_call_chunk` {index, id?, function}; `error`;"
            " `end_stream` {conversation_id, message_id, finish_reason, usage}."
        ),
    )
    async def post_messages(body: MessagesRequest, raw: Request, caller: CallerDep) -> Response:
        accepted_at = time.perf_counter()
        store = require_store(gw.store)
        new = [m.to_message() for m in body.messages]
        requested = gw.check(body.model, new, body)  # bad input: refused before any read
        limit = min(store.history_limit, gw.config.server.max_messages)
        earlier: list[Message] = []
        owner = caller.client_id
        if body.conversation_id is None:
            conversation_id = uuid.uuid4().hex  # created with the turn, if it is stored
        else:
            conversation_id = body.conversation_id
            found = await store.get_conversation(conversation_id, owner=caller.sees)
            if found is None:
                raise NotFound(
                    f"conversation {conversation_id!r} not found", param="conversation_id"
                )
            owner = found.owner  # an admin's turn goes into the owner's conversation
            earlier = [
                Message(
                    role=m.role,
                    content=m.content,
                    tool_calls=tuple(tool_call_from_dict(c) for c in m.tool_calls or ()),
                    tool_call_id=m.tool_call_id,
                )
                for m in await store.history(conversation_id, limit)
            ]
        # As the store's history has it: messages without text or calls are left out.
        history = [*earlier, *(m for m in new if m.content or m.tool_calls)][-limit:]

        async def store_turn(*, model: str | None = None, error: str | None = None) -> int:
            reply = await store.add_turn(
                conversation_id,
                [
                    (m.role, m.content, [tool_call_dict(c) for c in m.tool_calls], m.tool_call_id)
                    for m in new
                ],
                create_for=owner if body.conversation_id is None else None,
                title=_title(new),
                conversation_model=None if requested is None else requested.name,
                model=model,
                error=error,
            )
            return reply.id

        try:
            answer = await gw.open(
                body.model,
                history,
                body,
                conversation_id=conversation_id,
                owner=caller.client_id,
                accepted_at=accepted_at,
            )
        except RequestError:
            raise  # the request was wrong (maybe only for the routed model): nothing stored
        except Exception as exc:
            # The engine could not start: the user's turn is kept, with a reply saying why.
            why = exc.message if isinstance(exc, ChatfleetError) else "generation failed"
            await best_effort(lambda: store_turn(error=why), "store of a failed turn")
            raise
        try:
            message_id = await store_turn(model=answer.model)
        except BaseException:
            await answer.aclose()
            raise
        turn = _Turn(gw, store, writes, owner, conversation_id, message_id, answer)
        headers = route_headers(answer)
        if body.stream:
            return EventStream(turn.events(), headers=headers)
        await turn.collect(raw)
        return JSONResponse(turn.result(), headers=headers)

    @app.get(
        "/v1/conversations",
        tags=["conversations"],
        summary="The caller's stored conversations (an admin's: everyone's), most recently"
        " active first.",
    )
    async def list_conversations(
        caller: CallerDep, limit: Limit = 50, offset: Offset = 0
    ) -> dict[str, Any]:
        store = require_store(gw.store)
        found = await store.list_conversations(owner=caller.sees, limit=limit, offset=offset)
        return {"object": "list", "data": [c.to_dict() for c in found]}

    @app.get(
        "/v1/conversations/{conversation_id}",
        tags=["conversations"],
        summary="A conversation with all its messages (statuses included).",
    )
    async def get_conversation(conversation_id: str, caller: CallerDep) -> dict[str, Any]:
        store = require_store(gw.store)
        conversation = await store.get_conversation(conversation_id, owner=caller.sees)
        if conversation is None:
            raise NotFound(f"conversation {conversation_id!r} not found")
        body = conversation.to_dict()
        body["messages"] = [m.to_dict() for m in await store.messages(conversation_id)]
        return body

    @app.delete(
        "/v1/conversations/{conversation_id}",
        tags=["conversations"],
        summary="Delete a conversation and its messages.",
    )
    async def delete_conversation(conversation_id: str, caller: CallerDep) -> dict[str, Any]:
        store = require_store(gw.store)
        if not await store.delete_conversation(conversation_id, owner=caller.sees):
            raise NotFound(f"conversation {conversation_id!r} not found")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    return writes
