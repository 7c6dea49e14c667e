"""Tool calls and output formats between the protocol and an OpenAI-compatible API.

Passed through as they are: the upstream honours ``tools``, ``tool_choice`` and
``response_format`` itself (the capabilities of the openai engine say so), and its
tool-call deltas keep their index, id and argument pieces on the way back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from openai import omit
from openai.types.chat import ChatCompletionMessageParam

from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, ToolCallDelta

__all__ = ["call_chunks", "tool_arguments", "wire_messages"]


def wire_messages(messages: Iterable[Message]) -> list[ChatCompletionMessageParam]:
    """The conversation in OpenAI's shape, tool calls and tool results included."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["content"] = m.content or None
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out  # type: ignore[return-value]


def tool_arguments(request: GenerationRequest) -> dict[str, Any]:
    """``create``'s tool and format arguments (omitted when the request has none)."""
    tools: dict[str, Any] = {
        "tools": request.tools or omit,
        "tool_choice": request.tool_choice if request.tools and request.tool_choice else omit,
        "parallel_tool_calls": (
            request.parallel_tool_calls
            if request.tools and request.parallel_tool_calls is not None
            else omit
        ),
        "response_format": request.response_format or omit,
    }
    return tools


def call_chunks(calls: object, named: set[int]) -> list[Chunk]:
    """Chunks for the tool calls of a delta or a message (objects of the openai client).

    A call's first piece carries its id and name; a server that repeats them in later
    pieces (some do) has them dropped there, so each call is named once (``named``: the
    indexes named so far in this answer).
    """
    if not calls:
        return []
    if not isinstance(calls, list):
        raise ValueError("tool_calls is not a list")
    chunks = []
    for position, call in enumerate(calls):
        index = getattr(call, "index", position)
        function = getattr(call, "function", None)
        arguments = getattr(function, "arguments", None) or ""
        name = getattr(function, "name", None)
        call_id = getattr(call, "id", None)
        if not isinstance(index, int) or not isinstance(arguments, str):
            raise ValueError("a tool call is malformed")
        if index in named or not call_id:
            delta = ToolCallDelta(index, arguments)
        else:
            named.add(index)
            delta = ToolCallDelta(index, arguments, call_id, name if isinstance(name, str) else "")
        chunks.append(Chunk(kind="tool_call", text="", tokens=1, call=delta))
    return chunks
