"""Where a client's request meets FastAPI: what it sent wrong is a 400 in OpenAI's words.

`ClientRoute` parses every body with `parse_json` (never a 500 for bad JSON),
`validation_message` words a validation error as one message naming the parameter
(an unknown field as OpenAI's API words it), and `allowed_methods` fills a 405's
``Allow`` with every method of the path.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from chatfleet.serving.api._schemas import parse_json

__all__ = ["ClientRoute", "allowed_methods", "validation_message"]


class _ClientRequest(Request):
    """A request whose JSON body `parse_json` reads: what is not JSON is a 400, never a 500."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class ClientRoute(APIRoute):
    """A route that hands FastAPI's body parsing a `_ClientRequest`.

    FastAPI turns `json.JSONDecodeError` into a validation error (400) but any other
    parse failure into a vague 400, and `json.loads` raises `RecursionError` for deeply
    nested input: with `parse_json` every body that is not JSON gets the same answer.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_client_request(request: Request) -> Response:
            return await handle(_ClientRequest(request.scope, request.receive))

        return handle_client_request


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        # OpenAI's own wording for a field its API does not know.
        return f"Unrecognized request argument supplied: {param}", param
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)
