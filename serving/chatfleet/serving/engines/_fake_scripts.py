"""What the fake engine says when a request offers tools or asks for JSON.

Pure functions of the request and the fake's settings, so the same request always
gets the same calls and the same document: tests and offline agents can predict them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from chatfleet.serving.config import FakeToolCallsConfig
from chatfleet.serving.protocol import GenerationRequest, ToolCall

__all__ = ["answer_to_tool_result", "json_document", "tool_calls"]

#: Nesting past this is cut short (a recursive ``$ref`` must still end).
_MAX_DEPTH = 8
#: Values one document may have, and the longest string and array: a schema asking
#: for more (``minItems: 10**9``) gets a document that breaks it, not a hung replica.
_BUDGET = 2_000
_MAX_STRING = 4_096
_MAX_ITEMS = 64


class _Budget:
    def __init__(self) -> None:
        self.left = _BUDGET

    def spend(self) -> bool:
        self.left -= 1
        return self.left >= 0


def tool_calls(
    settings: FakeToolCallsConfig, request: GenerationRequest, words: Iterator[str]
) -> list[ToolCall]:
    """The calls the fake makes for ``request``; empty when it answers in text.

    It calls when tools are offered and ``tool_choice`` is not ``none``: always for
    ``required`` or a named tool, and for ``auto`` when ``settings.enabled`` and the
    last message is not a tool's result (else the agent loop would never end).
    """
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return []
    forced = choice == "required" or isinstance(choice, dict)
    last = request.messages[-1] if request.messages else None
    if not forced and (not settings.enabled or (last is not None and last.role == "tool")):
        return []
    functions = {t["function"]["name"]: t["function"] for t in request.tools}
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif settings.tool in functions:
        name = settings.tool
    else:
        name = next(iter(functions))
    schema = functions[name].get("parameters") or {"type": "object", "properties": {}}
    count = settings.parallel if request.parallel_tool_calls is not False else 1
    calls = []
    for i in range(count):
        arguments = dict(settings.arguments) or _example(schema, words, schema, _Budget())
        calls.append(
            ToolCall(
                id=f"call_{request.request_id[:16]}_{i}",
                name=name,
                arguments=json.dumps(arguments),
            )
        )
    return calls


def answer_to_tool_result(request: GenerationRequest) -> str | None:
    """After a tool's result, an answer that uses it; ``None`` otherwise."""
    last = request.messages[-1] if request.messages else None
    if last is None or last.role != "tool":
        return None
    names = {c.id: c.name for m in request.messages for c in m.tool_calls}
    name = names.get(last.tool_call_id or "", "the tool")
    return f"{name} returned {last.content}"


def json_document(response_format: dict[str, Any], words: Iterator[str]) -> str:
    """A JSON text that ``response_format`` (json_object or json_schema) accepts."""
    if response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema", {}).get("schema") or {}
        return json.dumps(_example(schema, words, schema, _Budget()))
    return json.dumps({"answer": " ".join(next(words) for _ in range(6))})


def _example(
    schema: Any, words: Iterator[str], root: dict[str, Any], budget: _Budget, depth: int = 0
) -> Any:
    """A value ``schema`` accepts, built from its first choices (enum, anyOf...).

    ``schema`` has passed `check_schema`, so its keywords have their types; a boolean
    subschema (``true``) takes anything, and gets null.
    """
    if not isinstance(schema, dict) or depth > _MAX_DEPTH or not budget.spend():
        return None
    deeper = depth + 1
    if isinstance(schema.get("$ref"), str):
        return _example(_resolve(schema["$ref"], root), words, root, budget, deeper)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            branches = [b for b in schema[key] if isinstance(b, dict) and b.get("type") != "null"]
            return _example((branches or schema[key])[0], words, root, budget, deeper)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            if isinstance(part, dict) and isinstance(part.get("$ref"), str):
                part = _resolve(part["$ref"], root)
            if not isinstance(part, dict):
                continue
            properties = {**merged.get("properties", {}), **part.get("properties", {})}
            merged = {**merged, **part, "properties": properties}
        return _example(merged, words, root, budget, deeper)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {n: _example(sub, words, root, budget, deeper) for n, sub in properties.items()}
    if kind == "array":
        count = min(max(schema.get("minItems", 1), 1), _MAX_ITEMS)
        count = min(count, schema.get("maxItems", count))
        items = schema.get("items", {})
        return [_example(items, words, root, budget, deeper) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, words)


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    node: Any = root
    for part in ref.removeprefix("#/").split("/") if ref.startswith("#/") else []:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + (1 if integer else 0.5))
    high = schema.get("maximum", schema.get("exclusiveMaximum", low + 84) - (1 if integer else 0.5))
    value = max(low, min(high, 42))
    return int(value) if integer else float(value)


_FORMATS = {
    "date": "2025-01-01",
    "date-time": "2025-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "fox@example.com",
    "uri": "https://example.com/fox",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _string(schema: dict[str, Any], words: Iterator[str]) -> str:
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    text = next(words)
    while len(text) < min(schema.get("minLength", 0), _MAX_STRING):
        text += " " + next(words)
    return text[: schema["maxLength"]] if "maxLength" in schema else text
