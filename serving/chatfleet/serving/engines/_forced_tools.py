"""``tool_choice`` ``required`` or a named function, for an engine that has neither but
can constrain its answer to a JSON schema (Ollama's ``format``).

What vLLM's OpenAI server does for tool parsers without a forced choice: the answer is
constrained, then read back as tool calls.

- A named function: the schema is that function's ``parameters``; the whole answer is
  its arguments. Streamed as it comes, one ``arguments`` piece per piece of answer.
- ``required``: the schema is an array of ``{"name": ..., "parameters": ...}`` objects,
  one ``anyOf`` branch per tool (its name as a one-value enum, its parameters' schema),
  ``minItems`` 1 and, for ``parallel_tool_calls: false``, ``maxItems`` 1. The tools'
  ``$defs`` are hoisted to the root so their ``#/$defs/...`` references still resolve
  (a name two tools define differently is renamed in the later one). A JSON array cannot
  be read as calls before its objects are whole, so the answer is parsed when it ends
  and its calls are sent then, each whole.
"""

from __future__ import annotations

import json
from typing import Any

from chatfleet.serving.protocol import Chunk, FinishReason, GenerationRequest, ToolCallDelta

__all__ = ["ForcedCalls", "forced_schema"]

#: What a function without ``parameters`` takes (OpenAI's default: no arguments).
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_DEFS_KEYS = ("$defs", "definitions")


def forced_schema(request: GenerationRequest) -> dict[str, Any] | None:
    """The JSON schema that forces ``request``'s tool choice; None unless it is forced."""
    functions = [t["function"] for t in request.tools]
    named = _named(request)
    if named is not None:
        return next(_parameters(f) for f in functions if f["name"] == named)
    if request.tool_choice != "required" or not functions:
        return None
    root: dict[str, Any] = {}
    branches = []
    for function in functions:
        parameters = _hoisted(_parameters(function), function["name"], root)
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function["name"]]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return {**schema, **root}


class ForcedCalls:
    """Reads a forced answer's text back as tool-call chunks (`forced_schema`'s reverse).

    `feed` takes the answer's text as it comes, `finish` its end; both return the chunks
    to send, their calls numbered from ``next_index`` (the calls of this answer so far).
    """

    def __init__(self, request: GenerationRequest) -> None:
        self._request = request
        self._named = _named(request)
        self._index: int | None = None  # the named call's, once started
        self._text: list[str] = []

    @staticmethod
    def of(request: GenerationRequest) -> ForcedCalls | None:
        return ForcedCalls(request) if forced_schema(request) is not None else None

    def feed(self, text: str, next_index: int) -> list[Chunk]:
        if self._named is None:
            self._text.append(text)
            return []
        if self._index is None:
            text = text.lstrip()  # a constrained decoder may open with blank space
            if not text:
                return []
            self._index = next_index
            return [self._chunk(self._index, text, self._named)]
        return [self._chunk(self._index, text)]

    def finish(self, next_index: int, finish_reason: FinishReason) -> list[Chunk]:
        """The calls still to send; `ValueError` when the answer is not the calls asked
        for (text cut by ``length`` is the caller's to send as text)."""
        if self._named is not None:
            if self._index is None:  # nothing came: a call with no arguments, still a call
                return [self._chunk(next_index, "{}", self._named)]
            return []
        text = "".join(self._text)
        try:
            calls = json.loads(text)
        except ValueError:
            raise ValueError(f"the answer is not JSON ({finish_reason})") from None
        names = {t["function"]["name"] for t in self._request.tools}
        if not _are_calls(calls, names):
            raise ValueError("the answer is not a list of tool calls")
        if self._request.parallel_tool_calls is False:
            calls = calls[:1]
        return [
            self._chunk(next_index + i, json.dumps(c["parameters"]), c["name"])
            for i, c in enumerate(calls)
        ]

    @property
    def text(self) -> str:
        """What ``required``'s answer said so far (sent as text when it was cut short)."""
        return "".join(self._text)

    def _chunk(self, index: int, arguments: str, name: str | None = None) -> Chunk:
        call_id = None if name is None else f"call_{self._request.request_id[:16]}_{index}"
        return Chunk(kind="tool_call", text="", call=ToolCallDelta(index, arguments, call_id, name))


def _named(request: GenerationRequest) -> str | None:
    choice = request.tool_choice
    if isinstance(choice, dict) and request.tools:
        name = (choice.get("function") or {}).get("name")
        return name if isinstance(name, str) else None
    return None


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return parameters if parameters else dict(_NO_PARAMETERS)


def _are_calls(calls: object, names: set[str]) -> bool:
    return (
        isinstance(calls, list)
        and bool(calls)
        and all(
            isinstance(c, dict) and c.get("name") in names and isinstance(c.get("parameters"), dict)
            for c in calls
        )
    )


def _hoisted(schema: dict[str, Any], tool: str, root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its definitions, which move into ``root`` (renamed on a clash)."""
    schema = dict(schema)
    found = {key: schema.pop(key) for key in _DEFS_KEYS if isinstance(schema.get(key), dict)}
    renames = {
        f"#/{key}/{name}": f"#/{key}/{tool}__{name}"
        for key, defs in found.items()
        for name, definition in defs.items()
        if root.get(key, {}).get(name, definition) != definition
    }
    if renames:
        schema, found = _renamed_refs(schema, renames), _renamed_refs(found, renames)
    for key, defs in found.items():
        hoisted = root.setdefault(key, {})
        for name, definition in defs.items():
            clash = f"#/{key}/{name}" in renames
            hoisted[f"{tool}__{name}" if clash else name] = definition
    return schema


def _renamed_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _renamed_refs(v, renames) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str):
            out["$ref"] = _renamed_ref(ref, renames)
        return out
    if isinstance(node, list):
        return [_renamed_refs(v, renames) for v in node]
    return node


def _renamed_ref(ref: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if ref == old or ref.startswith(old + "/"):
            return new + ref[len(old) :]
    return ref
