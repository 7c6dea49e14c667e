"""The serving exception tree, and how each error reaches a client.

    ChatfleetError                     500 internal_error
    ├── RequestError                   400 invalid_request_error
    │   ├── ModelNotFound              404 model_not_found
    │   ├── NotFound                   404 not_found (unknown conversation or session)
    │   ├── NotConfigured              404 not_configured (no classifier, compressor, router...)
    │   ├── Conflict                   409 conflict (e.g. cancelling a finished session)
    │   └── PayloadTooLarge            413 payload_too_large
    ├── AuthenticationError            401 invalid_token (missing, forged, expired, revoked)
    │   ├── InvalidClient              401 invalid_client (unknown client or wrong secret)
    │   ├── TokenExpired               401 token_expired (ends an open WebSocket: 1008)
    │   └── TokenRevoked               401 token_revoked (ends an open WebSocket: 1008)
    ├── EngineError                    502 engine_error
    │   ├── EngineUnavailable          503 engine_unavailable (missing extra, not loaded)
    │   │   └── ModelStarting          503 model_starting (no replica started within the
    │   │                                  cold-start bound; Retry-After)
    │   ├── UpstreamError              502 upstream_error (remote API / Ollama said no)
    │   └── RelayLost                  502 relay_lost (the token relay link broke mid-stream)
    ├── StoreUnavailable               503 store_unavailable (database unreachable)
    ├── ShuttingDown                   503 shutting_down (the replica drains: retry elsewhere;
    │                                      mid-stream, the answer ends as "interrupted")
    └── Overloaded                     429 rate_limited
        ├── BudgetExceeded             429 budget_exceeded (a client's budget; Retry-After)
        ├── ModelBusy                  429 model_busy (every replica full; Retry-After)
        └── ServerBusy                 429 server_busy (ingress HTTP budget; Retry-After)

Each class carries its HTTP status and a stable machine-readable ``code``; the
ingress maps them to OpenAI-shaped JSON bodies, SSE ``error`` events and
WebSocket ``error`` frames in one place (``chatfleet.serving.api``). Messages
are written for clients: they never contain stack traces or secrets.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "ChatfleetError",
    "Conflict",
    "EngineError",
    "EngineUnavailable",
    "InvalidClient",
    "ModelBusy",
    "ModelNotFound",
    "ModelStarting",
    "NotConfigured",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RelayLost",
    "RequestError",
    "ServerBusy",
    "ShuttingDown",
    "StoreUnavailable",
    "TokenExpired",
    "TokenRevoked",
    "UpstreamError",
]


class ChatfleetError(Exception):
    status_code: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"
    #: Seconds after which a retry may succeed (sent as ``Retry-After``), when known.
    retry_after: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(
        self,
    ) -> tuple[type[ChatfleetError], tuple[str], dict[str, str | int | None]]:
        # Crosses Ray handles: keep the message, param and retry_after through pickling.
        return (
            type(self),
            (self.message,),
            {"param": self.param, "retry_after": self.retry_after},
        )


class RequestError(ChatfleetError):
    status_code = 400
    code = "invalid_request_error"
    error_type = "invalid_request_error"


class ModelNotFound(RequestError):
    status_code = 404
    code = "model_not_found"


class NotFound(RequestError):
    status_code = 404
    code = "not_found"


class NotConfigured(RequestError):
    """The request needs a part of the server (classifier, compressor, router) it lacks."""

    status_code = 404
    code = "not_configured"


class Conflict(RequestError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "payload_too_large"


class AuthenticationError(ChatfleetError):
    """No valid bearer token. HTTP adds ``WWW-Authenticate: Bearer``; WebSocket closes 1008."""

    status_code = 401
    code = "invalid_token"
    error_type = "authentication_error"


class InvalidClient(AuthenticationError):
    code = "invalid_client"


class TokenExpired(AuthenticationError):
    """The token of an open WebSocket expired: refresh it and reconnect."""

    code = "token_expired"


class TokenRevoked(AuthenticationError):
    """The token of an open WebSocket was revoked."""

    code = "token_revoked"


class EngineError(ChatfleetError):
    status_code = 502
    code = "engine_error"


class EngineUnavailable(EngineError):
    status_code = 503
    code = "engine_unavailable"


class ModelStarting(EngineUnavailable):
    """No replica of the model was running, and none started within the cold-start bound
    (``autoscaling.cold_start_timeout_s``). An `EngineError`, so ``auto`` falls back."""

    code = "model_starting"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(EngineError):
    status_code = 502
    code = "upstream_error"


class RelayLost(EngineError):
    """The token relay between an engine and the ingress broke: not the model's fault."""

    code = "relay_lost"


class StoreUnavailable(ChatfleetError):
    status_code = 503
    code = "store_unavailable"


class ShuttingDown(ChatfleetError):
    """The replica is draining: new work goes elsewhere, streams past the grace period end."""

    status_code = 503
    code = "shutting_down"
    #: Seconds after which another replica (behind the same Service) likely answers.
    retry_after = 1


class Overloaded(ChatfleetError):
    status_code = 429
    code = "rate_limited"
    error_type = "rate_limit_error"


class BudgetExceeded(Overloaded):
    """A client used up a budget (``auth.clients[].budget``); ``param`` names which."""

    code = "budget_exceeded"
    error_type = "insufficient_quota"

    def __init__(self, message: str, *, param: str, retry_after: int) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class _Busy(Overloaded):
    """Too busy now; ``retry_after`` says when to try again."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelBusy(_Busy):
    """Every replica of the model is full and the request waited its bound for one."""

    code = "model_busy"


class ServerBusy(_Busy):
    """The ingress replica holds its budget of HTTP requests (sockets are apart)."""

    code = "server_busy"
