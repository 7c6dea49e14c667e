"""The ingress: a FastAPI app built from plain objects.

`create_app` takes the config and one `EngineClient` per model. In one process
(tests, benchmarks) the clients wrap engines directly (`LocalEngineClient`);
under Ray Serve they wrap deployment handles (`chatfleet.serving.app`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatfleet.serving import telemetry
from chatfleet.serving.api._admission import HttpAdmission
from chatfleet.serving.api._auth import AuthMiddleware, add_auth_routes, is_public
from chatfleet.serving.api._boundary import ClientRoute, allowed_methods, validation_message
from chatfleet.serving.api._chat_request import ChatCompletionRequest
from chatfleet.serving.api._clients import (
    ClassifierClient,
    CompressorClient,
    EmbeddingsClient,
    EngineClient,
    RouterClient,
)
from chatfleet.serving.api._conversations import add_conversation_routes
from chatfleet.serving.api._dashboard import add_dashboard_routes
from chatfleet.serving.api._drain import DrainGuard
from chatfleet.serving.api._embeddings import add_embeddings_routes
from chatfleet.serving.api._gateway import CONVERSATION_HEADER, VERSION, Gateway
from chatfleet.serving.api._loading import Held, native_stream, openai_held, opened_or_held
from chatfleet.serving.api._long_lived import LongLivedSockets
from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._middleware import BodyLimit, RequestMetrics
from chatfleet.serving.api._models import add_model_routes
from chatfleet.serving.api._openapi import document_responses
from chatfleet.serving.api._responses import add_responses_routes
from chatfleet.serving.api._routing_api import add_routing_routes
from chatfleet.serving.api._schemas import GenerateRequest, error_body
from chatfleet.serving.api._session_api import add_session_routes
from chatfleet.serving.api._streaming import EventStream
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.api._tracing import TracingMiddleware
from chatfleet.serving.api._usage_api import add_usage_routes
from chatfleet.serving.api._wire import (
    generate_events,
    openai_completion,
    openai_events,
    route_headers,
)
from chatfleet.serving.api._ws_chat import add_chat_ws_routes
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig, EngineCapabilities
from chatfleet.serving.errors import ChatfleetError, RequestError
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)


def create_app(
    config: AppConfig,
    engines: Mapping[str, EngineClient],
    *,
    router: RouterClient | None = None,
    classifier: ClassifierClient | None = None,
    compressor: CompressorClient | None = None,
    embeddings: EmbeddingsClient | None = None,
    metrics: Metrics | None = None,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    store: Store | None = None,
    auth: Authenticator | None = None,
    tracer_provider: telemetry.TracerProvider | None = None,
) -> FastAPI:
    """Build the ingress ASGI app. ``on_startup`` runs once before serving.

    ``auth`` is required when ``config.auth.enabled`` (the default) and ignored otherwise.
    ``tracer_provider`` (from `telemetry.configure_tracing`) records a span per request;
    None: OpenTelemetry's global provider (a no-op unless one is installed).
    """
    if config.auth.enabled and auth is None:
        raise ValueError(
            "config.auth.enabled needs an Authenticator (auth=...); or set auth.enabled to false"
        )
    metrics = metrics or Metrics()
    gw = Gateway(
        config,
        engines,
        metrics,
        router=router,
        classifier=classifier,
        compressor=compressor,
        embeddings=embeddings,
        store=store,
        auth=auth if config.auth.enabled else None,
        tracer_provider=tracer_provider,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The store (if any) opens first: it is migrated and connected before serving.
        if store is not None:
            await store.start()
            await sessions.start()  # lease, recovery, other replicas' events
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            await sessions.close()  # running sessions are stored as interrupted
            await conversation_writes.drain()
            await gw.usage.drain()
            if store is not None:
                await store.close()

    app = FastAPI(
        title="chatfleet",
        version=VERSION,
        summary="Streaming LLM chat gateway: OpenAI-compatible API, SSE and WebSocket.",
        lifespan=lifespan,
    )
    app.router.route_class = ClientRoute  # before any route is added
    app.state.gateway = gw

    def error_response(exc: ChatfleetError) -> JSONResponse:
        metrics.errors.labels(exc.code).inc()
        retry = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return JSONResponse(
            error_body(exc.message, type_=exc.error_type, code=exc.code, param=exc.param),
            status_code=exc.status_code,
            headers=retry,
        )

    @app.exception_handler(ChatfleetError)
    async def _chatfleet_error(_: Request, exc: ChatfleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(RequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route on the path; a path served by
            # several routes (GET and DELETE) allows all of theirs.
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(
            error_body(str(exc.detail), type_="invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(ChatfleetError("internal server error"))

    # Innermost: counts the WebSockets the app takes (not those refused on the way).
    app.add_middleware(LongLivedSockets)
    app.add_middleware(HttpAdmission, limit=config.ingress.max_ongoing_requests, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(BodyLimit, limit=config.server.max_body_bytes)
    if gw.auth is not None:
        # Outside the body limit (no reading bodies of strangers), inside CORS (preflights).
        app.add_middleware(AuthMiddleware, auth=gw.auth, metrics=metrics)
    if config.server.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[telemetry.TRACE_HEADER],
        )
    app.add_middleware(DrainGuard, drain=gw.drain)  # before auth: refusing is cheaper
    # Outermost: rejected requests (413, 401, CORS) get a span and a trace id too.
    app.add_middleware(TracingMiddleware, tracer=gw.tracer)

    # ---- health ---------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health", tags=["health"], summary="Details: version and each model's state.")
    async def health() -> dict[str, Any]:
        states = await gw.model_states()
        ok = all(s == "ready" for s in states.values())
        status = "draining" if gw.drain.draining else "ok" if ok else "degraded"
        return {"status": status, "version": VERSION, "models": states}

    @app.get(
        "/ready",
        tags=["health"],
        summary="Readiness: every model can serve.",
        responses={503: {"description": "Not ready: the same body, with ready false."}},
    )
    async def ready() -> JSONResponse:
        if gw.drain.draining:  # at once: the Service must stop routing here
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        states = await gw.model_states()
        ok = all(s == "ready" for s in states.values())
        body: dict[str, Any] = {"ready": ok, "models": states}
        if store is not None:
            body["store"] = "ready" if await store.ping() else "unavailable"
            body["ready"] = ok = ok and body["store"] == "ready"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of this replica.")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- OpenAI-compatible -----------------------------------------------------

    add_model_routes(app, gw)

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat completion, streamed or not.")
    async def chat_completions(
        body: ChatCompletionRequest, raw: Request, caller: CallerDep
    ) -> Response:
        opened = await opened_or_held(
            body.stream,
            gw.open,
            body.model,
            [m.to_message() for m in body.messages],
            body,
            conversation_id=raw.headers.get(CONVERSATION_HEADER) or body.conversation_id,
            owner=caller.client_id,
            accepted_at=time.perf_counter(),
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if isinstance(opened, Held):  # a replica starts: say so at once
            return openai_held(gw, opened, include_usage)
        answer = opened
        headers = route_headers(answer)
        completion_id = f"chatcmpl-{answer.request.request_id}"
        if body.stream:
            return EventStream(
                openai_events(gw, answer, completion_id, include_usage), headers=headers
            )
        await answer.collect()
        return JSONResponse(openai_completion(answer, completion_id), headers=headers)

    # ---- chatfleet native --------------------------------------------------------

    @app.post(
        "/api/generate",
        tags=["generate"],
        summary="Stream a generation from a named model as server-sent events.",
        description=(
            "Events: `metadata` {model, request_id}; `thinking_chunk` and `text_chunk`"
            " {text}; `error` {error: {message, code}}; `end_stream` {finish_reason, usage}."
        ),
    )
    async def generate(body: GenerateRequest, caller: CallerDep) -> Response:
        model = gw.resolve(body.model).name
        opened = await opened_or_held(
            True, gw.open, model, body.to_messages(), body, owner=caller.client_id
        )
        return native_stream(gw, opened, lambda a: generate_events(gw, a, a.request.request_id))

    add_routing_routes(app, gw)
    conversation_writes = add_conversation_routes(app, gw)
    add_responses_routes(app, gw, conversation_writes)
    sessions = add_session_routes(app, gw)
    add_auth_routes(app, gw)
    add_chat_ws_routes(app, gw)
    add_usage_routes(app, gw)
    add_embeddings_routes(app, gw)
    add_dashboard_routes(app)
    document_responses(
        app,
        is_public=is_public if gw.auth is not None else None,
        max_tokens=max(m.defaults.max_tokens_limit for m in config.models),
        served=EngineCapabilities.combined([m.capabilities() for m in config.models]),
    )
    return app
