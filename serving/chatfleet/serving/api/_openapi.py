"""The OpenAPI document as the server really answers, in one hook over every route.

FastAPI documents a 422 it never sends here (validation errors are 400s in OpenAI's
error shape, `chatfleet.serving.errors`), and knows nothing of the middleware's
refusals or of streamed bodies. `document_responses` rewrites each operation once:

- 400 where there is a body or a parameter to get wrong; 413 where there is a body;
  404 where the path names a resource; 401 and 429 behind the bearer token;
- the statuses a route raises beyond those (`ROUTE_ERRORS`: unknown model, conflict,
  engine and store failures), each with the `ErrorResponse` schema;
- ``text/event-stream`` for streamed answers (`STREAMED`), ``text/plain`` for /metrics.

Schemathesis holds the server to this document (tests/unit/test_openapi_schemathesis.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from chatfleet.serving.api._chat_request import document_what_is_served
from chatfleet.serving.api._schemas import TEXT_PATTERN, ErrorResponse
from chatfleet.serving.config import EngineCapabilities

__all__ = ["ROUTE_ERRORS", "STREAMED", "document_responses"]

_WHY = {
    400: "Invalid request: not JSON, a field out of range, a parameter the model cannot honour.",
    401: "Missing, expired or revoked bearer token (or a wrong client secret).",
    404: "Unknown model, resource, or a part of the server that is not configured.",
    409: "The resource is in a state that does not allow this.",
    413: "The request body is larger than server.max_body_bytes.",
    429: "Rate-limited (Retry-After says when to come back) or too busy.",
    502: "The engine or its upstream failed before the first token.",
    503: "The engine or the store is unavailable, or the replica is draining (shutting_down).",
}
_ENGINE = (404, 502, 503)  # unknown model; engine failed or not ready
#: "METHOD /path" -> the statuses the route raises beyond the common ones.
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "POST /v1/chat/completions": _ENGINE,
    "POST /api/generate": _ENGINE,
    "POST /api/models/select": _ENGINE,
    "POST /api/classify": (404, 503),
    "POST /api/compress": (404, 503),
    "POST /v1/embeddings": (404, 503),  # unknown model or none configured; not ready
    "GET /api/usage": (503,),
    "GET /api/model-rankings": (404,),
    "POST /v1/messages": _ENGINE,
    "POST /v1/responses": _ENGINE,  # and previous_response_id not found
    "GET /v1/responses/{response_id}": (503,),
    "GET /v1/responses/{response_id}/input_items": (503,),
    "DELETE /v1/responses/{response_id}": (503,),
    "GET /v1/conversations": (503,),
    "GET /v1/conversations/{conversation_id}": (503,),
    "DELETE /v1/conversations/{conversation_id}": (503,),
    "POST /api/sessions": (404, 429, 503),
    "POST /api/alerts": (404, 429, 503),
    "GET /api/sessions": (503,),
    "GET /api/sessions/{session_id}": (503,),
    "POST /api/sessions/{session_id}/cancel": (409, 503),
    "POST /auth/token": (401, 429),
    "POST /auth/refresh": (401,),
}
_SSE = {
    "schema": {
        "type": "object",
        "description": "One server-sent event; `data` is JSON (or OpenAI's final [DONE]).",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
        "required": ["data"],
    }
}
#: "METHOD /path" -> its 200 media types: JSON, events, or either (as ``stream`` says).
STREAMED: dict[str, tuple[str, ...]] = {
    "POST /v1/chat/completions": ("application/json", "text/event-stream"),
    "POST /v1/messages": ("application/json", "text/event-stream"),
    "POST /v1/responses": ("application/json", "text/event-stream"),
    "POST /api/generate": ("text/event-stream",),
    "POST /api/models/select": ("text/event-stream",),
}
_PLAIN = {"GET /metrics": "text/plain"}
_METHODS = ("get", "post", "put", "patch", "delete")
_ANSWER_LENGTH = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def document_responses(
    app: FastAPI,
    *,
    is_public: Callable[[str], bool] | None,
    max_tokens: int,
    served: EngineCapabilities,
) -> None:
    """Rewrite ``app``'s OpenAPI document; ``is_public`` (auth on) tells open paths.

    ``max_tokens`` is the largest limit of any served model and ``served`` what at least
    one served model can do: the request schemas say no more than that (a model's own
    smaller limit or missing capability is still a 400 the document cannot express).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error.pop("$defs", {}))
            schemas["ErrorResponse"] = error
            for schemas_name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(schemas_name, None)  # only FastAPI's 422 used them
            document_what_is_served(schemas, served)
            for name, body in schemas.items():
                _limit_answer_length(body, max_tokens)
                if not name.startswith("Error"):
                    _text_without_nul(body)
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    if method in _METHODS:
                        _rewrite(f"{method.upper()} {path}", operation, is_public)
                        _text_without_nul(operation.get("requestBody", {}))
                        _text_without_nul(operation.get("parameters", []))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _text_without_nul(node: Any) -> None:
    """Every string a client sends says what `check_text` refuses (NUL), as a pattern."""
    if isinstance(node, list):
        for item in node:
            _text_without_nul(item)
    elif isinstance(node, dict):
        if node.get("type") == "string" and not ({"pattern", "enum", "const"} & node.keys()):
            node["pattern"] = TEXT_PATTERN
        for value in node.values():
            _text_without_nul(value)


def _limit_answer_length(body: dict[str, Any], max_tokens: int) -> None:
    for name in _ANSWER_LENGTH:
        field = body.get("properties", {}).get(name)
        for branch in [] if field is None else [field, *field.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = max_tokens


def _rewrite(
    route: str, operation: dict[str, Any], is_public: Callable[[str], bool] | None
) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)
    path = route.partition(" ")[2]
    statuses = set(ROUTE_ERRORS.get(route, ()))
    if "requestBody" in operation or operation.get("parameters"):
        statuses.add(400)
    if "requestBody" in operation:
        statuses.add(413)
    if "{" in path:
        statuses.add(404)
    if is_public is not None and not is_public(path):
        statuses |= {401, 429}
    for status in sorted(statuses):
        responses.setdefault(
            str(status),
            {
                "description": _WHY[status],
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                },
            },
        )
    ok = next((responses[s] for s in ("200", "202") if s in responses), None)
    if ok is None:
        return
    if route in STREAMED:
        json_body = ok.get("content", {}).get("application/json", {"schema": {}})
        ok["content"] = {
            media: (_SSE if media == "text/event-stream" else json_body)
            for media in STREAMED[route]
        }
    elif route in _PLAIN:
        ok["content"] = {_PLAIN[route]: {"schema": {"type": "string"}}}
