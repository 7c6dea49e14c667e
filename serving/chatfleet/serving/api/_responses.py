"""``POST /v1/responses``: OpenAI's Responses API over the conversation store (reading
and deleting stored responses: `api._responses_stored`).

A stored response (``store``, the default, on a server with a store) is a turn of a
stored conversation owned by the caller: its input items are the turn's messages (the
``instructions`` are not: as in OpenAI's API they hold for one response only), its
answer the turn's reply, stored as ``/v1/messages`` stores one (checkpointed while it
streams, finished as complete, cancelled or failed). ``previous_response_id`` continues
that response's chain of turns; another client's response id is not found (404), as an
unknown one. ``store: false`` keeps nothing (such a response cannot be continued).
A server without a store answers every response unstored (``"store": false``).

A streamed response whose model is scaled to zero starts with the comment line
``: loading model <name>`` (as chat completions' stream does, `api._loading`: OpenAI's
SDK skips comments, where an event of a type it does not know would reach the code
iterating it); the turn is stored once the answer opens.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from chatfleet.serving.api._answers import (
    Answer,
    BackgroundWrites,
    Delta,
    best_effort,
    require_store,
)
from chatfleet.serving.api._conversations import _title, _Turn
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._loading import (
    Held,
    HeldStream,
    held_events,
    loading_comment,
    opened_or_held,
)
from chatfleet.serving.api._responses_schemas import ResponsesRequest
from chatfleet.serving.api._responses_stored import add_stored_response_routes
from chatfleet.serving.api._responses_wire import ResponseWire
from chatfleet.serving.api._streaming import EventStream
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.api._wire import route_headers, tool_call_dict, tool_call_from_dict
from chatfleet.serving.errors import ChatfleetError, NotFound, RequestError
from chatfleet.serving.protocol import Message
from chatfleet.serving.store import StoredMessage, StoredResponse

_ID_PREFIX = "resp_"


def _message(stored: StoredMessage) -> Message:
    calls = tuple(tool_call_from_dict(c) for c in stored.tool_calls or ())
    return Message(stored.role, stored.content, calls, stored.tool_call_id)


def add_responses_routes(app: FastAPI, gw: Gateway, writes: BackgroundWrites) -> None:
    """The Responses API; its store writes finish through ``writes`` (drained on shutdown)."""
    add_stored_response_routes(app, gw, writes)

    @app.post(
        "/v1/responses",
        tags=["openai"],
        summary="A model response (OpenAI's Responses API), streamed or not.",
        description=(
            "Returns a Response object (`resp_...`: output items `message` with"
            " `output_text`, `function_call`, `reasoning`; usage). With `stream: true`,"
            " server-sent events as OpenAI sends them (`response.created` ..."
            " `response.completed`, each with a `sequence_number`)."
            " `previous_response_id` continues a stored response of the caller's."
        ),
    )
    async def create_response(body: ResponsesRequest, raw: Request, caller: CallerDep) -> Response:
        accepted_at = time.perf_counter()
        new = body.input_messages()
        # The prompt has the input as sent (as chat completions' has its messages); the
        # store keeps what was said, as its history has it.
        said = [m for m in new if m.content or m.tool_calls]
        instructions = [Message("system", body.instructions)] if body.instructions else []
        previous: StoredResponse | None = None
        earlier: list[Message] = []
        if body.previous_response_id is not None:
            reads = require_store(gw.store)
            previous = await reads.get_response(body.previous_response_id, owner=caller.sees)
            if previous is None:
                raise NotFound(
                    f"response {body.previous_response_id!r} not found",
                    param="previous_response_id",
                )
            # Earlier turns fill what room the new input leaves (too much input is a 400).
            room = min(
                reads.history_limit,
                gw.config.server.max_messages - len(new) - len(instructions),
            )
            if room > 0:
                earlier = [_message(m) for m in await reads.response_history(previous, room)]
        history = [*instructions, *earlier, *new]
        with_tools = any(m.role == "tool" or m.tool_calls for m in history)
        sampling = body.sampling(with_tool_messages=with_tools)
        try:
            gw.check(body.model, history, sampling)  # refused before anything is stored
        except RequestError as exc:
            if exc.param != "max_tokens":
                raise
            # The gateway knows chat completions' name for it; say the one that was sent.
            message = exc.message.replace("max_tokens", "max_output_tokens", 1)
            raise RequestError(message, param="max_output_tokens") from None
        store = gw.store if body.store else None
        response_id = f"{_ID_PREFIX}{uuid.uuid4().hex}"
        owner = caller.client_id if previous is None else previous.owner
        conversation_id = uuid.uuid4().hex if previous is None else previous.conversation_id
        opened = await opened_or_held(
            body.stream,
            gw.open,
            body.model,
            history,
            sampling,
            conversation_id=conversation_id,
            owner=caller.client_id,
            accepted_at=accepted_at,
        )
        wire = ResponseWire(body, response_id, stored=store is not None)

        async def begin(answer: Answer) -> _Turn | None:
            """The stored turn the answer streams into (none unstored)."""
            if store is None:
                return None
            try:
                reply = await store.add_response_turn(
                    response_id,
                    [
                        (
                            m.role,
                            m.content,
                            [tool_call_dict(c) for c in m.tool_calls],
                            m.tool_call_id,
                        )
                        for m in said
                    ],
                    owner=owner,
                    previous=previous,
                    conversation_id=conversation_id,
                    title=_title(said),
                    model=answer.model,
                )
            except BaseException:
                await answer.aclose()
                raise
            return _Turn(gw, store, writes, owner, conversation_id, reply.id, answer)

        async def keep(final: dict[str, Any]) -> None:
            if store is not None:
                stored = store  # narrowed for the closure
                await best_effort(
                    lambda: writes.settle(stored.finish_response(response_id, final)),
                    "store of a response",
                )

        def events(answer: Answer, turn: _Turn | None) -> AsyncGenerator[str, None]:
            deltas: AsyncGenerator[Delta, None] = answer.deltas() if turn is None else turn.deltas()
            return wire.events(gw, answer, deltas, keep)

        if isinstance(opened, Held):  # a replica starts: say so at once, store once opened

            async def held_answer(answer: Answer) -> AsyncGenerator[str, None]:
                try:
                    turn = await begin(answer)
                except Exception as exc:  # previous_response_id deleted meanwhile...
                    for line in wire.refused(gw, exc):
                        yield line
                    return
                stream = events(answer, turn)
                async with contextlib.aclosing(stream):
                    async for line in stream:
                        yield line

            # Before any event, as chat completions' stream: a comment OpenAI's SDK skips.
            notice = loading_comment(opened.model)
            failed = functools.partial(wire.refused, gw)
            return HeldStream(opened, held_events(opened, notice, held_answer, failed))
        answer = opened
        turn = await begin(answer)

        headers = route_headers(answer)
        if body.stream:
            return EventStream(events(answer, turn), headers=headers)
        try:
            if turn is not None:
                await turn.collect(raw)  # a client gone: stopped, stored as cancelled
            else:
                await answer.collect()
        except Exception as exc:
            error = exc if isinstance(exc, ChatfleetError) else ChatfleetError("generation failed")
            await keep(wire.body(answer, status="failed", error=error))
            raise
        final = wire.body(answer)
        await keep(final)
        return JSONResponse(final, headers=headers)
