"""Bearer-token enforcement (one ASGI middleware for HTTP and WebSocket) and ``/auth/*``.

Every path but `PUBLIC_PATHS` and the dashboard's static files needs a valid
access token: ``Authorization: Bearer <jwt>``, or for a WebSocket also
``?token=<jwt>`` (browsers cannot set headers on a WebSocket). Refusals:

- HTTP: 401 with an OpenAI-shaped error body and ``WWW-Authenticate: Bearer``;
  429 with ``Retry-After`` when the client's token bucket is empty.
- WebSocket: the connection is accepted, gets one ``error`` frame
  ``{"type": "error", "error", "code"}``, and is closed with 1008 (policy
  violation), or 1013 (try again later) when rate-limited.

The verified `Claims` ride in the ASGI scope; handlers read them with `request_claims`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._schemas import ClientBody, error_body, parse_json
from chatfleet.serving.api._source import source_address
from chatfleet.serving.auth import Authenticator, Claims
from chatfleet.serving.errors import AuthenticationError, ChatfleetError, Overloaded, RequestError

__all__ = ["PUBLIC_PATHS", "AuthMiddleware", "add_auth_routes", "request_claims"]

PUBLIC_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/favicon.ico",
        "/auth/token",
        "/auth/refresh",
    }
)
PUBLIC_PREFIXES = ("/static/",)
_CLAIMS = "chatfleet.claims"
_M = TypeVar("_M", bound=BaseModel)
# WebSocket close codes (RFC 6455 §7.4.1).
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013


def request_claims(connection: HTTPConnection) -> Claims | None:
    """The caller's verified claims; None when auth is off (or on a public path)."""
    claims: Claims | None = connection.scope.get(_CLAIMS)
    return claims


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def _challenge(exc: AuthenticationError | None) -> dict[str, str]:
    # RFC 6750 §3: no error attribute when the request carried no token at all.
    if exc is None:
        return {"WWW-Authenticate": 'Bearer realm="chatfleet"'}
    description = exc.message.replace('"', "'")
    return {
        "WWW-Authenticate": (
            f'Bearer realm="chatfleet", error="{exc.code}", error_description="{description}"'
        )
    }


def ws_error_frame(message: str, code: str, **extra: Any) -> str:
    """The WebSocket ``error`` frame (shared by the middleware and /ws/chat)."""
    return json.dumps({"type": "error", "error": message, "code": code, **extra})


class AuthMiddleware:
    """Verify the bearer token of every non-public HTTP request and WebSocket."""

    def __init__(self, app: ASGIApp, auth: Authenticator, metrics: Metrics) -> None:
        self.app = app
        self.auth = auth
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (kind == "http" and is_public(_route_path(scope))):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token: str | None = None
        try:
            token = _bearer(headers)
            if token is None and kind == "websocket":
                token = HTTPConnection(scope).query_params.get("token") or None
            if token is None:
                raise AuthenticationError("missing bearer token")
            claims = await self.auth.validate(token)
        except AuthenticationError as exc:
            self.metrics.errors.labels(exc.code).inc()
            await self._deny(
                scope, receive, send, exc, presented=token is not None or "authorization" in headers
            )
            return
        wait = self.auth.retry_after(claims.client_id)
        if wait > 0:
            self.metrics.errors.labels(Overloaded.code).inc()
            await self._limited(scope, receive, send, wait)
            return
        scope[_CLAIMS] = claims
        await self.app(scope, receive, send)

    async def _deny(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exc: AuthenticationError,
        *,
        presented: bool,
    ) -> None:
        if scope["type"] == "websocket":
            await _refuse_websocket(receive, send, exc.message, exc.code, WS_POLICY_VIOLATION)
            return
        response = JSONResponse(
            error_body(exc.message, type_=exc.error_type, code=exc.code),
            status_code=exc.status_code,
            headers=_challenge(exc if presented else None),
        )
        await response(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, wait: float) -> None:
        retry_after = max(1, math.ceil(wait))
        message = f"rate limit exceeded; retry in {retry_after} s"
        if scope["type"] == "websocket":
            await _refuse_websocket(
                receive,
                send,
                message,
                Overloaded.code,
                WS_TRY_AGAIN_LATER,
                retry_after=retry_after,
            )
            return
        await _too_many_requests(retry_after)(scope, receive, send)


def _too_many_requests(retry_after: int) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"rate limit exceeded; retry in {retry_after} s",
            type_=Overloaded.error_type,
            code=Overloaded.code,
        ),
        status_code=Overloaded.status_code,
        headers={"Retry-After": str(retry_after)},
    )


async def _refuse_websocket(
    receive: Receive, send: Send, message: str, code: str, close_code: int, **extra: Any
) -> None:
    # Accept first so the client can read why; then close with the policy code.
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": ws_error_frame(message, code, **extra)})
    await send({"type": "websocket.close", "code": close_code, "reason": message[:120]})


# ---- /auth/* ---------------------------------------------------------------------


class _Form(ClientBody):
    model_config = ConfigDict(extra="ignore")


class TokenRequest(_Form):
    """`POST /auth/token` (JSON or form; the client may also use HTTP Basic)."""

    grant_type: Literal["client_credentials"] = Field(
        "client_credentials", description="Only the client-credentials grant."
    )
    client_id: str = Field(min_length=1, max_length=200, description="A registered client.")
    client_secret: str = Field(min_length=1, max_length=4096, description="Its secret.")
    scope: str | None = Field(None, description="Space-separated subset of its scopes.")
    # What the chat gateway's clients send along; accepted (and documented) for them.
    device_name: str | None = Field(None, description="The caller's device name; not used.")
    device_type: str | None = Field(None, description="The caller's kind of device; not used.")


class RefreshRequest(_Form):
    """`POST /auth/refresh` (JSON or form)."""

    grant_type: Literal["refresh_token"] = Field("refresh_token", description="Fixed.")
    refresh_token: str = Field(min_length=1, max_length=8192, description="A refresh token.")


class TokenField(_Form):
    """`POST /auth/validate` and `/auth/revoke`: a token; empty means the bearer token."""

    token: str | None = Field(None, max_length=8192, description="The token in question.")


def _body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": required,
            "content": {
                "application/json": {"schema": schema},
                "application/x-www-form-urlencoded": {"schema": schema},
            },
        }
    }


async def _fields(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = parse_json(raw)
    except ValueError:
        raise RequestError("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    return data


def _parse(model: type[_M], data: dict[str, Any]) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        msg = str(first.get("msg", "invalid value"))
        raise RequestError(f"{param}: {msg}" if param else msg, param=param) from None


def _basic_credentials(request: Request) -> dict[str, str]:
    value = request.headers.get("authorization", "")
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return {}
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise RequestError("malformed Basic credentials") from None
    return {"client_id": unquote(client_id), "client_secret": unquote(secret)}


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI document (/docs gets an Authorize button)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An access token from POST /auth/token.",
            }
            schema["security"] = [{"bearer": []}]
            for path, operations in schema.get("paths", {}).items():
                if is_public(path):
                    for operation in operations.values():
                        operation["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_auth_routes(app: FastAPI, gw: Gateway) -> None:
    """``/auth/token``, ``/auth/refresh``, ``/auth/validate``, ``/auth/revoke`` (auth on)."""
    auth = gw.auth
    if auth is None:
        return

    @app.exception_handler(AuthenticationError)
    async def _unauthorized(_: Request, exc: ChatfleetError) -> JSONResponse:
        gw.metrics.errors.labels(exc.code).inc()
        return JSONResponse(
            error_body(exc.message, type_=exc.error_type, code=exc.code, param=exc.param),
            status_code=exc.status_code,
            headers=_challenge(exc if isinstance(exc, AuthenticationError) else None),
        )

    _document_bearer_auth(app)
    no_store = {"Cache-Control": "no-store"}  # RFC 6749 §5.1

    @app.post(
        "/auth/token",
        tags=["auth"],
        summary="Access + refresh tokens for a registered client (client credentials).",
        openapi_extra=_body_doc(TokenRequest),
    )
    async def token(request: Request) -> JSONResponse:
        fields = {**await _fields(request), **_basic_credentials(request)}
        body = _parse(TokenRequest, fields)
        # Secrets are guessed here: a wrong one costs the address it comes from (for
        # that client id, and in all), never the client id, so no one can lock it out.
        source = source_address(request, auth.config.guessing.forwarded_hops)
        wait = auth.guessing.wait(body.client_id, source)
        if wait > 0:
            gw.metrics.errors.labels(Overloaded.code).inc()
            return _too_many_requests(max(1, math.ceil(wait)))
        pair = await auth.issue(body.client_id, body.client_secret, body.scope, source=source)
        return JSONResponse(pair.as_response(), headers=no_store)

    @app.post(
        "/auth/refresh",
        tags=["auth"],
        summary="A new token pair for a refresh token; the old refresh token is revoked.",
        openapi_extra=_body_doc(RefreshRequest),
    )
    async def refresh(request: Request) -> JSONResponse:
        body = _parse(RefreshRequest, await _fields(request))
        pair = await auth.refresh(body.refresh_token)
        return JSONResponse(pair.as_response(), headers=no_store)

    def token_in_question(request: Request, body: TokenField) -> str:
        if body.token:
            return body.token
        bearer = _bearer(request.headers)
        if bearer is None:  # unreachable behind the middleware
            raise AuthenticationError("missing bearer token")
        return bearer

    @app.post(
        "/auth/validate",
        tags=["auth"],
        summary="The claims of a valid token (default: the bearer token), else 401.",
        openapi_extra=_body_doc(TokenField, required=False),
    )
    async def validate(request: Request) -> dict[str, Any]:
        body = _parse(TokenField, await _fields(request))
        token = token_in_question(request, body)
        kind = auth.decode(token).token_type
        claims = await auth.validate(token, token_type=kind)
        return {"active": True, "claims": claims.as_dict()}

    @app.post(
        "/auth/revoke",
        tags=["auth"],
        summary="Revoke one of the caller's tokens (default: the bearer token itself).",
        openapi_extra=_body_doc(TokenField, required=False),
    )
    async def revoke(request: Request) -> dict[str, Any]:
        body = _parse(TokenField, await _fields(request))
        claims = await auth.revoke(token_in_question(request, body), by=request_claims(request))
        return {"revoked": True, "jti": claims.jti, "type": claims.token_type}
