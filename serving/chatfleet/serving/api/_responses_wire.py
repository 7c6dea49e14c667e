"""An `Answer` as OpenAI's Responses API answers it: the Response object, or its events.

The output holds, in the order the engine produced them, a ``reasoning`` item (the
engine's thinking, as ``reasoning_text``), a ``message`` item (one ``output_text``
part) and a ``function_call`` item per tool call. Streamed, every event carries its
``type`` and a ``sequence_number``: ``response.created``, ``response.in_progress``,
then per item ``response.output_item.added``, its deltas
(``response.content_part.added`` + ``response.output_text.delta`` /
``response.reasoning_text.delta``, or ``response.function_call_arguments.delta``),
their ``.done`` events and ``response.output_item.done``; last
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut the
answer short). A failure once streaming has started is an ``error`` event followed by
``response.failed``; so is one before the answer opened, once a loading notice was
sent (`ResponseWire.refused`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from chatfleet.serving.api._answers import Answer, Delta
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._responses_schemas import ResponsesRequest
from chatfleet.serving.api._streaming import sse
from chatfleet.serving.errors import ChatfleetError

__all__ = ["ResponseWire"]

#: An output item: ("reasoning",), ("message",) or ("call", the call's index).
_Key = tuple[str, ...] | tuple[str, int]

_STATUS_OF_FINISH = {"length": "incomplete", "cancelled": "cancelled", "error": "failed"}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseWire:
    """One response's objects and events; ``response_id`` is ``resp_`` + hex."""

    def __init__(self, request: ResponsesRequest, response_id: str, *, stored: bool) -> None:
        self.request = request
        self.id = response_id
        self.stored = stored
        self.created_at = int(time.time())
        self._suffix = response_id.removeprefix("resp_")

    def item_id(self, key: _Key) -> str:
        if key[0] == "call":
            return f"fc_{self._suffix}_{key[1]}"
        return f"{'rs' if key[0] == 'reasoning' else 'msg'}_{self._suffix}"

    @staticmethod
    def keys(answer: Answer) -> list[_Key]:
        """The items of a collected answer, in the order engines produce them."""
        keys: list[_Key] = []
        if answer.thinking:
            keys.append(("reasoning",))
        if answer.text or not answer.calls:
            keys.append(("message",))
        keys += [("call", i) for i in sorted(answer.calls)]
        return keys

    def item(self, answer: Answer, key: _Key, status: str) -> dict[str, Any]:
        """The item as it stands (``status`` in_progress: empty, as first announced)."""
        item_id = self.item_id(key)
        empty = status == "in_progress"
        if key[0] == "reasoning":
            content = [] if empty else [{"type": "reasoning_text", "text": answer.reasoning}]
            return {"type": "reasoning", "id": item_id, "summary": [], "content": content}
        if key[0] == "message":
            return {
                "type": "message",
                "id": item_id,
                "status": status,
                "role": "assistant",
                "content": [] if empty else [_text_part(answer.content)],
            }
        call_id, name, arguments = answer.calls[int(key[1])]
        return {
            "type": "function_call",
            "id": item_id,
            "call_id": call_id,
            "name": name,
            "arguments": "" if empty else arguments,
            "status": status,
        }

    def body(
        self,
        answer: Answer | None,
        *,
        status: str | None = None,
        keys: list[_Key] | None = None,
        error: ChatfleetError | None = None,
    ) -> dict[str, Any]:
        """The Response object; ``status`` None: as the answer's finish says."""
        request = self.request
        if status is None:
            assert answer is not None
            status = _STATUS_OF_FINISH.get(answer.finish_reason or "cancelled", "completed")
        done = "incomplete" if status == "incomplete" else "completed"
        output = []
        if answer is not None and status != "in_progress":
            keys = self.keys(answer) if keys is None else keys
            output = [self.item(answer, key, done) for key in keys]
        fmt = (
            request.text.format.model_dump(by_alias=True, exclude_none=True)
            if request.text
            else None
        )
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None if error is None else {"code": error.code, "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model if answer is None else answer.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "store": self.stored,
            "temperature": None if answer is None else answer.request.temperature,
            "top_p": None if answer is None else answer.request.top_p,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": _tool_choice(request),
            "tools": [t.model_dump(exclude_none=True) for t in request.tools or ()],
            "truncation": "disabled",
            "metadata": request.metadata or {},
            "user": request.user,
            "usage": None,
        }
        if answer is not None and status != "in_progress":
            usage = answer.final_usage()
            body["usage"] = {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            }
        if answer is not None and answer.route is not None:
            body["chatfleet_route"] = answer.route
        return body

    def refused(self, gw: Gateway, exc: Exception) -> list[str]:
        """A stream whose answer never opened (its model did not start...): an ``error``
        event, then ``response.failed``."""
        error = exc if isinstance(exc, ChatfleetError) else ChatfleetError("generation failed")
        detail = gw.error_event(exc)["error"]
        fields = {"code": detail["code"], "message": detail["message"], "param": detail["param"]}
        failed = self.body(None, status="failed", error=error)
        return [
            sse({"type": "error", "sequence_number": 0, **fields}, "error"),
            sse(
                {"type": "response.failed", "sequence_number": 1, "response": failed},
                "response.failed",
            ),
        ]

    async def events(
        self,
        gw: Gateway,
        answer: Answer,
        deltas: AsyncGenerator[Delta, None],
        on_end: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> AsyncGenerator[str, None]:
        """The answer as Responses events; ``on_end`` gets the final Response object
        (cancelled when the client went away)."""
        sequence = 0
        order: list[_Key] = []
        current: _Key | None = None
        final: dict[str, Any] | None = None

        def event(kind: str, **fields: Any) -> str:
            nonlocal sequence
            sequence += 1
            return sse({"type": kind, "sequence_number": sequence - 1, **fields}, kind)

        def where(key: _Key) -> dict[str, Any]:
            return {"item_id": self.item_id(key), "output_index": order.index(key)}

        def opened(key: _Key) -> list[str]:
            order.append(key)
            index = len(order) - 1
            item = self.item(answer, key, "in_progress")
            out = [event("response.output_item.added", output_index=index, item=item)]
            if key[0] != "call":
                part = (
                    {"type": "reasoning_text", "text": ""}
                    if key[0] == "reasoning"
                    else _text_part("")
                )
                out.append(
                    event("response.content_part.added", **where(key), content_index=0, part=part)
                )
            return out

        def closed(key: _Key) -> list[str]:
            item = self.item(answer, key, "completed")
            at = where(key)
            if key[0] == "call":
                out = [
                    event(
                        "response.function_call_arguments.done",
                        **at,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                ]
            else:
                part = item["content"][0]
                kind = "reasoning_text" if key[0] == "reasoning" else "output_text"
                extra: dict[str, Any] = {} if key[0] == "reasoning" else {"logprobs": []}
                out = [
                    event(
                        f"response.{kind}.done", **at, content_index=0, text=part["text"], **extra
                    ),
                    event("response.content_part.done", **at, content_index=0, part=part),
                ]
            out.append(
                event("response.output_item.done", output_index=at["output_index"], item=item)
            )
            return out

        try:
            started = self.body(answer, status="in_progress")
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            async for delta in deltas:
                for chunk in delta.chunks:
                    if chunk.call is not None:
                        key: _Key = ("call", chunk.call.index)
                    elif chunk.text:
                        key = ("reasoning",) if chunk.kind == "thinking" else ("message",)
                    else:
                        continue
                    if key != current:
                        if current is not None:
                            for line in closed(current):
                                yield line
                        current = key
                        if key not in order:  # an item already closed takes its deltas late
                            for line in opened(key):
                                yield line
                    at = where(key)
                    if chunk.call is not None:
                        if chunk.call.arguments:
                            yield event(
                                "response.function_call_arguments.delta",
                                **at,
                                delta=chunk.call.arguments,
                            )
                    elif key[0] == "reasoning":
                        yield event(
                            "response.reasoning_text.delta", **at, content_index=0, delta=chunk.text
                        )
                    else:
                        yield event(
                            "response.output_text.delta",
                            **at,
                            content_index=0,
                            delta=chunk.text,
                            logprobs=[],
                        )
            if current is not None:
                for line in closed(current):
                    yield line
            if not order:  # nothing said: still an (empty) message, as the object shows
                for line in [*opened(("message",)), *closed(("message",))]:
                    yield line
            final = self.body(answer, keys=order)
            kind = (
                "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            )
            yield event(kind, response=final)
        except Exception as exc:
            error = exc if isinstance(exc, ChatfleetError) else ChatfleetError("generation failed")
            detail = gw.error_event(exc)["error"]
            yield event(
                "error", code=detail["code"], message=detail["message"], param=detail["param"]
            )
            final = self.body(answer, status="failed", keys=order, error=error)
            yield event("response.failed", response=final)
        finally:
            await deltas.aclose()
            await on_end(final or self.body(answer, status="cancelled", keys=order))


def _tool_choice(request: ResponsesRequest) -> Any:
    choice = request.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()
