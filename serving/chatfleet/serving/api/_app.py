"""The ingress: a FastAPI app built from plain objects.

`create_app` takes the config and one `EngineClient` per model. In one process
(tests, benchmarks) the clients wrap engines directly (`LocalEngineClient`);
under Ray Serve they wrap deployment handles (`chatfleet.serving.app`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._schemas import (
    ChatCompletionRequest,
    GenerateRequest,
    SamplingFields,
    error_body,
)
from chatfleet.serving.api._streaming import EventStream, sse
from chatfleet.serving.config import AppConfig, CoalesceConfig, ModelConfig
from chatfleet.serving.engines import Engine, coalesce
from chatfleet.serving.errors import (
    ChatfleetError,
    ModelNotFound,
    PayloadTooLarge,
    RequestError,
)
from chatfleet.serving.protocol import Chunk, GenerationRequest, Usage
from chatfleet.serving.protocol import Message as ChatMessage

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class EngineClient(Protocol):
    """How the ingress reaches one model: batches of chunks, and readiness."""

    def batches(self, request: GenerationRequest) -> AsyncIterator[list[Chunk]]: ...

    async def is_ready(self) -> bool: ...


class LocalEngineClient:
    """An engine in this process, with the same token batching as over Ray."""

    def __init__(self, engine: Engine, coalescing: CoalesceConfig | None = None) -> None:
        self.engine = engine
        self.coalescing = coalescing or CoalesceConfig()
        self.started = False

    async def start(self) -> None:
        await self.engine.start()
        self.started = True

    def batches(self, request: GenerationRequest) -> AsyncIterator[list[Chunk]]:
        return coalesce(
            self.engine.stream(request),
            max_tokens=self.coalescing.max_tokens,
            max_delay=self.coalescing.max_delay_ms / 1000,
        )

    async def is_ready(self) -> bool:
        return self.started


class _BodyLimit:
    """Reject bodies over the limit with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # A chunked body: read it here, up to the limit, then replay it.
        body: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            error_body(
                f"request body exceeds {self.limit} bytes",
                type_="invalid_request_error",
                code=PayloadTooLarge.code,
            ),
            status_code=413,
        )
        await response(scope, receive, send)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


class _Gateway:
    """The request handlers' shared state: config, engines, metrics."""

    def __init__(
        self, config: AppConfig, engines: Mapping[str, EngineClient], metrics: Metrics
    ) -> None:
        missing = [m.name for m in config.models if m.name not in engines]
        if missing:
            raise ValueError(f"no engine client for models: {', '.join(missing)}")
        self.config = config
        self.engines = engines
        self.metrics = metrics
        self.created = int(time.time())

    def resolve(self, name: str | None) -> ModelConfig:
        model = self.config.model(name or self.config.default_model_name)
        if model is None:
            served = ", ".join(m.name for m in self.config.models)
            raise ModelNotFound(
                f"model {name!r} is not served here (served: {served})", param="model"
            )
        return model

    def generation_request(
        self, model: ModelConfig, messages: list[ChatMessage], sampling: SamplingFields
    ) -> GenerationRequest:
        if len(messages) > self.config.server.max_messages:
            raise RequestError(
                f"at most {self.config.server.max_messages} messages per request",
                param="messages",
            )
        limits = model.defaults
        max_tokens = sampling.max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise RequestError(
                f"max_tokens {max_tokens} exceeds this model's limit of {limits.max_tokens_limit}",
                param="max_tokens",
            )
        return GenerationRequest(
            model=model.name,
            messages=messages,
            max_tokens=max_tokens,
            temperature=limits.temperature
            if sampling.temperature is None
            else sampling.temperature,
            top_p=limits.top_p if sampling.top_p is None else sampling.top_p,
            stop=sampling.stop_list(),
            seed=sampling.seed,
        )

    async def open_stream(self, request: GenerationRequest) -> AsyncIterator[list[Chunk]]:
        """Start generating; errors before the first token raise here, not mid-stream.

        The returned iterator replays the first batch, records metrics, and stops
        the engine when it is closed early.
        """
        model = request.model
        m = self.metrics
        started = time.perf_counter()
        source = self.engines[model].batches(request)
        m.active_streams.labels(model).inc()
        try:
            first = await anext(source)
        except StopAsyncIteration:
            first = []
        except BaseException:
            m.active_streams.labels(model).dec()
            m.generations.labels(model, "error").inc()
            await _aclose(source)
            raise
        m.time_to_first_token.labels(model).observe(time.perf_counter() - started)
        return self._instrumented(model, first, source)

    async def _instrumented(
        self, model: str, first: list[Chunk], source: AsyncIterator[list[Chunk]]
    ) -> AsyncIterator[list[Chunk]]:
        m = self.metrics
        finish = "cancelled"
        last = time.perf_counter()
        try:
            batch: list[Chunk] | None = first
            while batch is not None:
                tokens = sum(c.tokens for c in batch)
                now = time.perf_counter()
                if batch is not first and tokens:
                    m.inter_token_latency.labels(model).observe((now - last) / tokens)
                last = now
                if tokens:
                    m.tokens.labels(model, "output").inc(tokens)
                for chunk in batch:
                    if chunk.usage is not None:
                        m.tokens.labels(model, "input").inc(chunk.usage.prompt_tokens)
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                yield batch
                try:
                    batch = await anext(source)
                except StopAsyncIteration:
                    batch = None
        except ChatfleetError:
            finish = "error"
            raise
        finally:
            m.active_streams.labels(model).dec()
            m.generations.labels(model, finish).inc()
            await _aclose(source)

    def error_event(self, exc: BaseException) -> dict[str, Any]:
        err = exc if isinstance(exc, ChatfleetError) else ChatfleetError("generation failed")
        if not isinstance(exc, ChatfleetError):
            logger.exception("stream failed", exc_info=exc)
        self.metrics.errors.labels(err.code).inc()
        return error_body(err.message, type_=err.error_type, code=err.code, param=err.param)


def create_app(
    config: AppConfig,
    engines: Mapping[str, EngineClient],
    *,
    metrics: Metrics | None = None,
    on_startup: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """Build the ingress ASGI app. ``on_startup`` runs once before serving."""
    metrics = metrics or Metrics()
    gw = _Gateway(config, engines, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        yield

    app = FastAPI(
        title="chatfleet",
        version=VERSION,
        summary="Streaming LLM chat gateway: OpenAI-compatible API, SSE and WebSocket.",
        lifespan=lifespan,
    )
    app.state.gateway = gw

    def error_response(exc: ChatfleetError) -> JSONResponse:
        metrics.errors.labels(exc.code).inc()
        return JSONResponse(
            error_body(exc.message, type_=exc.error_type, code=exc.code, param=exc.param),
            status_code=exc.status_code,
        )

    @app.exception_handler(ChatfleetError)
    async def _chatfleet_error(_: Request, exc: ChatfleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(RequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        return JSONResponse(
            error_body(str(exc.detail), type_="invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(ChatfleetError("internal server error"))

    @app.middleware("http")
    async def _count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.requests.labels(template, request.method, str(response.status_code)).inc()
        # For streams this is the time to the headers; the stream's own length is
        # in the TTFT/ITL histograms and chatfleet_generations_total.
        metrics.request_duration.labels(template).observe(time.perf_counter() - started)
        return response

    app.add_middleware(_BodyLimit, limit=config.server.max_body_bytes)
    if config.server.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    # ---- health ---------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def model_states() -> dict[str, str]:
        states = {}
        for name, client in engines.items():
            try:
                states[name] = "ready" if await client.is_ready() else "loading"
            except Exception:
                logger.warning("readiness check of %s failed", name, exc_info=True)
                states[name] = "unavailable"
        return states

    @app.get("/health", tags=["health"], summary="Details: version and each model's state.")
    async def health() -> dict[str, Any]:
        states = await model_states()
        ok = all(s == "ready" for s in states.values())
        return {"status": "ok" if ok else "degraded", "version": VERSION, "models": states}

    @app.get("/ready", tags=["health"], summary="Readiness: every model can serve.")
    async def ready() -> JSONResponse:
        states = await model_states()
        ok = all(s == "ready" for s in states.values())
        return JSONResponse({"ready": ok, "models": states}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of this replica.")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- OpenAI-compatible -----------------------------------------------------

    @app.get("/v1/models", tags=["openai"], summary="The served models.")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": gw.created,
                    "owned_by": "chatfleet",
                    "engine": m.engine,
                    "description": m.description,
                }
                for m in config.models
            ],
        }

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat completion, streamed or not.")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        model = gw.resolve(body.model)
        request = gw.generation_request(model, [m.to_message() for m in body.messages], body)
        completion_id = f"chatcmpl-{request.request_id}"
        batches = await gw.open_stream(request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(
                _openai_events(gw, batches, completion_id, model.name, include_usage)
            )
        return JSONResponse(await _openai_completion(batches, completion_id, model.name))

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
    async def generate(body: GenerateRequest) -> Response:
        model = gw.resolve(body.model)
        request = gw.generation_request(model, body.to_messages(), body)
        batches = await gw.open_stream(request)
        return EventStream(_generate_events(gw, batches, model.name, request.request_id))

    return app


async def _openai_completion(
    batches: AsyncIterator[list[Chunk]], completion_id: str, model: str
) -> dict[str, Any]:
    text: list[str] = []
    thinking: list[str] = []
    finish: str | None = None
    usage: Usage | None = None
    tokens = 0
    try:
        async for batch in batches:
            for chunk in batch:
                (thinking if chunk.kind == "thinking" else text).append(chunk.text)
                tokens += chunk.tokens
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
    finally:
        await _aclose(batches)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    usage = usage or Usage(prompt_tokens=0, completion_tokens=tokens)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish or "stop"}],
        "usage": _usage_dict(usage),
    }


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


async def _openai_events(
    gw: _Gateway,
    batches: AsyncIterator[list[Chunk]],
    completion_id: str,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())
    head = (
        f'{{"id":"{completion_id}","object":"chat.completion.chunk",'
        f'"created":{created},"model":{json.dumps(model)},"choices":'
    )

    def event(choices: str, extra: str = "") -> str:
        return f"data: {head}{choices}{extra}}}\n\n"

    usage: Usage | None = None
    finish: str | None = None
    tokens = 0
    try:
        yield event('[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]')
        async for batch in batches:
            for chunk in batch:
                tokens += chunk.tokens
                usage = chunk.usage or usage
                finish = chunk.finish_reason or finish
                if chunk.text:
                    key = "reasoning_content" if chunk.kind == "thinking" else "content"
                    delta = json.dumps({key: chunk.text})
                    yield event(f'[{{"index":0,"delta":{delta},"finish_reason":null}}]')
        yield event(f'[{{"index":0,"delta":{{}},"finish_reason":"{finish or "stop"}"}}]')
        if include_usage:
            final = usage or Usage(prompt_tokens=0, completion_tokens=tokens)
            yield event("[]", f',"usage":{json.dumps(_usage_dict(final))}')
    except ChatfleetError as exc:
        # OpenAI's own streams report late failures as an event with an "error" key.
        yield sse(gw.error_event(exc))
    except Exception as exc:
        yield sse(gw.error_event(exc))
    finally:
        await _aclose(batches)
    yield "data: [DONE]\n\n"


async def _generate_events(
    gw: _Gateway, batches: AsyncIterator[list[Chunk]], model: str, request_id: str
) -> AsyncIterator[str]:
    usage: Usage | None = None
    finish: str | None = None
    tokens = 0
    try:
        yield sse({"model": model, "request_id": request_id}, "metadata")
        async for batch in batches:
            for chunk in batch:
                tokens += chunk.tokens
                usage = chunk.usage or usage
                finish = chunk.finish_reason or finish
                if chunk.text:
                    kind = "thinking_chunk" if chunk.kind == "thinking" else "text_chunk"
                    yield sse({"text": chunk.text}, kind)
    except Exception as exc:
        yield sse(gw.error_event(exc), "error")
        finish = "error"
    finally:
        await _aclose(batches)
    final = usage or Usage(prompt_tokens=0, completion_tokens=tokens)
    yield sse({"finish_reason": finish or "stop", "usage": _usage_dict(final)}, "end_stream")
