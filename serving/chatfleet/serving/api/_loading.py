"""Telling a waiting client its model is loading (scaled to zero, replica starting).

`opened_or_held` runs a `Gateway.open` call and returns its `Answer` if it opened
without waiting for a replica to start, or else a `Held` answer as soon as the gateway
said the model is loading. Streaming handlers then tell the client at once (an SSE
comment ``: loading model <name>``, which OpenAI's clients skip; a ``loading`` event or
frame in chatfleet's own formats) and stream the answer once it opens, or an error
event if the model did not start in time (`ModelStarting`).
A non-streamed request just waits for `Gateway.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._streaming import EventStream, sse
from chatfleet.serving.api._wire import openai_events


class Held:
    """An answer still opening while a replica of ``model`` starts."""

    def __init__(self, model: str, opening: asyncio.Future[Answer]) -> None:
        self.model = model
        self._opening = opening

    async def answer(self) -> Answer:
        """The answer once it opens; raises what opening it raised (`ModelStarting`...)."""
        return await self._opening

    async def aclose(self) -> None:
        """Withdraw the request if it is still waiting; close its answer if it opened."""
        self._opening.cancel()
        await asyncio.wait({self._opening})  # never raises what opening raised
        if not self._opening.cancelled() and self._opening.exception() is None:
            await self._opening.result().aclose()


async def opened_or_held(
    hold: bool, open_answer: Callable[..., Awaitable[Answer]], *args: Any, **kwargs: Any
) -> Answer | Held:
    """``open_answer(*args, **kwargs, on_loading=...)``'s answer (a `Gateway.open`), or,
    if ``hold``, `Held` as soon as it calls ``on_loading``. Without ``hold`` (a reply
    that is not streamed) the answer is awaited here, whatever the wait."""
    if not hold:
        return await open_answer(*args, **kwargs)
    # One future, settled by whichever comes first: the model's name when the gateway
    # says it is loading, None when the answer opened (or failed to). Cheaper per
    # request than asyncio.wait on the two.
    first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def settle(value: str | None) -> None:
        if not first.done():
            first.set_result(value)

    opening = asyncio.ensure_future(open_answer(*args, **kwargs, on_loading=settle))
    opening.add_done_callback(lambda _: settle(None))
    try:
        model = await first
    except BaseException:  # the client went away: withdraw the request
        opening.cancel()
        opening.add_done_callback(_discard)
        raise
    if opening.done():
        return opening.result()
    assert model is not None
    return Held(model, opening)


def _discard(opening: asyncio.Future[Answer]) -> None:
    """Mark seen the error of an opening nobody waits for any more. One that opened just
    before it was withdrawn has its engine stream closed by asyncio's finaliser of
    abandoned async generators (a callback cannot await its ``aclose``)."""
    if not opening.cancelled():
        opening.exception()


async def after_notice(opened: Answer | Held, notify: Callable[[str], Awaitable[None]]) -> Answer:
    """The answer; a held one after ``await notify(model)`` (for formats that can send a
    notice and wait in place, as a WebSocket can), withdrawn if either fails."""
    if not isinstance(opened, Held):
        return opened
    try:
        await notify(opened.model)
        return await opened.answer()
    except BaseException:
        await opened.aclose()
        raise


async def held_events(
    held: Held,
    notice: str,
    events: Callable[[Answer], AsyncGenerator[str, None]],
    failed: Callable[[Exception], list[str]],
) -> AsyncGenerator[str, None]:
    """``notice`` at once, then ``events(answer)`` once it opens (``failed(exc)`` if not)."""
    try:
        yield notice
        try:
            answer = await held.answer()
        except Exception as exc:
            for event in failed(exc):
                yield event
            return
        stream = events(answer)
        async with contextlib.aclosing(stream):
            async for event in stream:
                yield event
    finally:
        await held.aclose()


class HeldStream(EventStream):
    """An `EventStream` of a held answer: withdrawn even if its body never started (the
    client left before the first byte), which closing the body alone would not do."""

    def __init__(
        self, held: Held, body: AsyncGenerator[str, None], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(body, headers)
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._held.aclose()


def loading_comment(model: str) -> str:
    """The notice of OpenAI's streams: an SSE comment, which OpenAI's clients skip."""
    return f": loading model {model}\n\n"


def openai_held(gw: Gateway, held: Held, include_usage: bool) -> HeldStream:
    """A held answer as OpenAI's stream, after a ``: loading model`` comment line."""

    def events(answer: Answer) -> AsyncGenerator[str, None]:
        completion_id = f"chatcmpl-{answer.request.request_id}"
        return openai_events(gw, answer, completion_id, include_usage)

    def failed(exc: Exception) -> list[str]:
        # As openai_events reports a late failure: an event with an "error" key.
        return [sse(gw.error_event(exc)), "data: [DONE]\n\n"]

    return HeldStream(held, held_events(held, loading_comment(held.model), events, failed))


def native_stream(
    gw: Gateway, opened: Answer | Held, events: Callable[[Answer], AsyncGenerator[str, None]]
) -> EventStream:
    """An answer as chatfleet's native SSE ``events``; a held one after a ``loading`` event."""
    if not isinstance(opened, Held):
        return EventStream(events(opened))
    held = opened

    def failed(exc: Exception) -> list[str]:
        end = {"finish_reason": "error", "usage": dict.fromkeys(_USAGE_KEYS, 0)}
        return [sse(gw.error_event(exc), "error"), sse(end, "end_stream")]

    notice = sse({"model": held.model, "status": "loading"}, "loading")
    return HeldStream(held, held_events(held, notice, events, failed))


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
