"""The messages an agent sends back after running a tool call, in OpenAI's shape."""

from __future__ import annotations

from typing import Any


def after_tool_call(
    messages: list[dict[str, Any]], call: dict[str, Any], result: str
) -> list[dict[str, Any]]:
    """``messages``, then the assistant's turn making ``call`` (a streamed call's ``id``,
    ``name`` and ``arguments``) and the tool's turn answering it with ``result``."""
    function = {"name": call["name"], "arguments": call["arguments"]}
    return [
        *messages,
        {
            "role": "assistant",
            "tool_calls": [{"id": call["id"], "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
