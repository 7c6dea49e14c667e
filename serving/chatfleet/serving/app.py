"""Ray Serve wiring: the only place deployments are bound.

``build_app`` is the application builder that ``serve run``, ``chatfleet serve``
and a RayService's serveConfigV2 (``import_path: chatfleet.serving.app:build_app``)
use. It lays out one ``EngineDeployment`` per model and one ``Ingress`` that
hosts the FastAPI app; the ingress streams straight from the engine chosen for a
request, one handle hop, with tokens already batched by the engine replica.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
from fastapi import FastAPI
from opentelemetry.trace import SpanKind
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve import metrics as serve_metrics
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatfleet.serving import telemetry
from chatfleet.serving.api import Metrics, create_app
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import (
    AppConfig,
    ClassifierConfig,
    CoalesceConfig,
    CompressorConfig,
    ModelConfig,
    TelemetryConfig,
    load_config,
)
from chatfleet.serving.engines import (
    coalesce,
    create_engine,
    delay_for_load,
    traced_generation,
)
from chatfleet.serving.errors import ChatfleetError, EngineError
from chatfleet.serving.protocol import (
    Chunk,
    Classification,
    Compression,
    GenerationRequest,
    Message,
)
from chatfleet.serving.relay import Links, Relay, RelayAddress, relay_batches
from chatfleet.serving.routing import PreviousRoute, Router, RoutingDecision
from chatfleet.serving.store import Store

__all__ = [
    "APP_NAME",
    "ClassifierDeployment",
    "CompressorDeployment",
    "EngineDeployment",
    "Ingress",
    "RouterDeployment",
    "build_app",
]

logger = logging.getLogger(__name__)

APP_NAME = "chatfleet"
_T = TypeVar("_T")
Handle = DeploymentHandle[Any]
# Replicas drain for this long on shutdown or redeploy; streams past it are cut.
_GRACEFUL_SHUTDOWN_S = 10.0


def _favour_the_event_loop() -> None:
    """Hand the GIL over every 0.5 ms instead of Python's 5 ms.

    A replica's asyncio loop shares the GIL with Ray's and gRPC's threads; at the
    default interval every wake-up of the loop can wait up to 5 ms behind them, and a
    first token crosses several such waits. At 128 paced streams (bench/gateway.py)
    this halved the time to first token (80 -> 39 ms p50).
    """
    sys.setswitchinterval(0.0005)


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class EngineDeployment:
    """One model's engine. Streams batched chunks to the ingress."""

    async def __init__(  # type: ignore[misc]
        self,
        model: ModelConfig,
        coalescing: CoalesceConfig,
        tracing: TelemetryConfig | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        _favour_the_event_loop()
        provider = telemetry.configure_tracing(
            tracing or TelemetryConfig(), component=f"engine-{model.name}"
        )
        self._tracer = telemetry.get_tracer(provider)
        self._engine = create_engine(model)
        self._links = Links()
        self._coalescing = coalescing
        self._stats = {"active": 0, "completed": 0, "cancelled": 0, "failed": 0}
        await self._engine.start()
        logger.info("engine %s (%s) ready", model.name, model.engine)

    async def generate(
        self,
        request: GenerationRequest,
        relay: RelayAddress | None = None,
        relay_key: str = "",
    ) -> AsyncGenerator[list[Chunk] | int, None]:
        """Batches of ``request``'s answer; with ``relay``, sent on the token relay
        instead, and then only their count is yielded (see `chatfleet.serving.relay`)."""
        self._stats["active"] += 1
        outcome = "completed"
        batches = coalesce(
            traced_generation(
                self._engine.stream(request), request, self._engine.model.engine, self._tracer
            ),
            max_tokens=self._coalescing.max_tokens,
            max_delay=lambda: delay_for_load(self._coalescing, self._stats["active"]),
            runs_ahead=self._engine.runs_ahead,
            limit=request.max_tokens,
        )
        link = await self._links.get(relay) if relay is not None else None
        source: AsyncGenerator[list[Chunk] | int, None] = (
            batches if link is None else relay_batches(link, relay_key, batches)
        )
        try:
            async for message in source:
                yield message
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except ChatfleetError:
            outcome = "failed"
            raise
        except Exception as exc:
            outcome = "failed"
            logger.exception("engine %s failed", self._engine.name)
            raise EngineError(f"model {self._engine.name} failed") from exc
        finally:
            self._stats["active"] -= 1
            self._stats[outcome] += 1
            if source is not batches:
                await source.aclose()
            await batches.aclose()

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, int]:
        """Counts of generations by outcome (how tests observe cancellation)."""
        return dict(self._stats)

    async def __del__(self) -> None:
        await self._engine.close()


@dataclass(frozen=True, slots=True)
class _ClassifyJob:
    prompt: str
    labels: tuple[str, ...] | None
    descriptions: tuple[tuple[str, str], ...] | None
    multi_label: bool

    @property
    def key(self) -> tuple[object, ...]:
        return (self.labels, self.descriptions, self.multi_label)


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class ClassifierDeployment:
    """The zero-shot classifier; concurrent requests are batched (``@serve.batch``)."""

    def __init__(self, config: ClassifierConfig, tracing: TelemetryConfig | None = None) -> None:
        from chatfleet.serving.routing.classifier import create_classifier

        logging.basicConfig(level=logging.INFO)
        provider = telemetry.configure_tracing(tracing or TelemetryConfig(), component="classifier")
        self._tracer = telemetry.get_tracer(provider)
        self._classifier = create_classifier(config)
        self._classifier.load()
        batched: Any = self._batched  # @serve.batch adds these setters
        batched.set_max_batch_size(config.max_batch_size)
        batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[_ClassifyJob]) -> list[Classification | Exception]:
        # Jobs with the same labels share one forward pass; a group's failure (bad
        # labels) goes back to that group's callers only, not the whole batch.
        results: list[Classification | Exception] = [RuntimeError("unclassified")] * len(jobs)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        for indices in groups.values():
            first = jobs[indices[0]]
            try:
                out = await asyncio.to_thread(
                    self._classifier.classify_batch,
                    [jobs[i].prompt for i in indices],
                    list(first.labels) if first.labels else None,
                    dict(first.descriptions) if first.descriptions else None,
                    first.multi_label,
                )
                for i, result in zip(indices, out, strict=True):
                    results[i] = result
            except Exception as exc:
                for i in indices:
                    results[i] = exc
        return results

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None = None,
        descriptions: dict[str, str] | None = None,
        multi_label: bool = False,
        trace_context: dict[str, str] | None = None,
    ) -> Classification:
        with self._tracer.start_as_current_span(
            "classifier.classify",
            context=telemetry.extract(trace_context),
            kind=SpanKind.SERVER,
        ):
            self._classifier.validate([prompt], labels, descriptions)  # before it joins a batch
            job = _ClassifyJob(
                prompt,
                tuple(labels) if labels else None,
                tuple(sorted(descriptions.items())) if descriptions else None,
                multi_label,
            )
            result = await self._batched(job)
            if isinstance(result, Exception):
                raise result
            return result


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class CompressorDeployment:
    """LLMLingua prompt compression (CPU- or GPU-bound; one call at a time per thread)."""

    def __init__(self, config: CompressorConfig, tracing: TelemetryConfig | None = None) -> None:
        from chatfleet.serving.routing.compressor import Compressor

        logging.basicConfig(level=logging.INFO)
        provider = telemetry.configure_tracing(tracing or TelemetryConfig(), component="compressor")
        self._tracer = telemetry.get_tracer(provider)
        self._compressor = Compressor(config)
        self._compressor.load()

    async def compress(
        self,
        context: str,
        question: str = "",
        ratio: float | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Compression:
        with self._tracer.start_as_current_span(
            "compressor.compress",
            context=telemetry.extract(trace_context),
            kind=SpanKind.SERVER,
        ):
            return await asyncio.to_thread(self._compressor.compress, context, question, ratio)


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class RouterDeployment:
    """Turns a request into a `RoutingDecision` (classifier and compressor inside)."""

    def __init__(
        self,
        config: AppConfig,
        classifier: Handle,
        compressor: Handle | None = None,
    ) -> None:
        classifier = _local_transport(classifier)
        compressor = _maybe_local_transport(compressor)

        async def classify(prompt: str) -> Classification:
            result: Classification = await classifier.classify.remote(
                prompt, trace_context=telemetry.inject()
            )
            return result

        async def compress(context: str, question: str) -> Compression:
            assert compressor is not None
            result: Compression = await compressor.compress.remote(
                context, question, trace_context=telemetry.inject()
            )
            return result

        provider = telemetry.configure_tracing(config.telemetry, component="router")
        self._router = Router(
            config,
            classify,
            compress if compressor is not None else None,
            tracer_provider=provider,
        )

    async def decide(
        self,
        messages: list[Message],
        previous: PreviousRoute | None,
        compress: bool,
        trace_context: dict[str, str] | None = None,
    ) -> RoutingDecision:
        with telemetry.continued(trace_context):
            return await _unwrapped(self._router.decide(messages, previous, compress))

    async def rankings(self) -> dict[str, Any]:
        return self._router.rankings()


async def _unwrapped(call: Awaitable[_T]) -> _T:
    """Await a handle call; re-raise our own errors as themselves, not RayTaskError."""
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, ChatfleetError):
            raise exc.cause from None
        raise


def _local_transport(handle: Handle) -> Handle:
    """``handle`` on the transport this process's Serve runs: gRPC in throughput mode.

    A handle carries its transport from the process that built the application, fixed
    when that process imported Serve; ``serve.run`` from a driver that imported Serve
    before RAY_SERVE_THROUGHPUT_OPTIMIZED was set would leave Ray actor calls, the
    slower path, between replicas that all serve gRPC.
    """
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)


def _maybe_local_transport(handle: Handle | None) -> Handle | None:
    return None if handle is None else _local_transport(handle)


class HandleRouterClient:
    def __init__(
        self,
        router: Handle | None,
        classifier: Handle | None,
        compressor: Handle | None,
    ) -> None:
        self._router = _maybe_local_transport(router)
        self._classifier = _maybe_local_transport(classifier)
        self._compressor = _maybe_local_transport(compressor)

    async def decide(
        self, messages: list[Message], previous: PreviousRoute | None, compress: bool
    ) -> RoutingDecision:
        assert self._router is not None
        return await _unwrapped(
            self._router.decide.remote(
                messages, previous, compress, trace_context=telemetry.inject()
            )
        )

    async def rankings(self) -> dict[str, Any]:
        assert self._router is not None
        return await _unwrapped(self._router.rankings.remote())

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification:
        assert self._classifier is not None
        return await _unwrapped(
            self._classifier.classify.remote(
                prompt, labels, descriptions, multi_label, trace_context=telemetry.inject()
            )
        )

    async def compress(self, context: str, question: str, ratio: float | None) -> Compression:
        assert self._compressor is not None
        return await _unwrapped(
            self._compressor.compress.remote(
                context, question, ratio, trace_context=telemetry.inject()
            )
        )


class HandleEngineClient:
    """The ingress's view of an `EngineDeployment`: one streaming handle call."""

    def __init__(
        self, handle: Handle, ready_timeout_s: float = 5.0, relay: Relay | None = None
    ) -> None:
        handle = _local_transport(handle)
        self._stream = handle.options(stream=True)
        self._handle = handle
        self._ready_timeout_s = ready_timeout_s
        self._relay = relay

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        address = None if self._relay is None else await self._relay.start()
        if self._relay is None or address is None:
            response: DeploymentResponseGenerator[Any] = self._stream.generate.remote(request)  # type: ignore[assignment]
            source: AsyncIterator[list[Chunk]] = response
        else:
            key = uuid.uuid4().hex
            response = self._stream.generate.remote(request, address, key)  # type: ignore[assignment]
            source = self._relay.receive(key, response)
        finished = False
        try:
            async for batch in source:
                yield batch
            finished = True
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, ChatfleetError) else None
            if cause is None:
                raise EngineError(f"model {request.model} failed") from exc
            raise cause from None
        except ConnectionError as exc:
            raise EngineError(f"model {request.model} failed: {exc}") from exc
        finally:
            if not finished:
                # The client went away (or we failed): stop the engine's generation.
                response.cancel()  # type: ignore[no-untyped-call]
                if source is not response:
                    await source.aclose()  # type: ignore[attr-defined]

    async def is_ready(self) -> bool:
        ready: bool = await asyncio.wait_for(
            self._handle.ready.remote(), timeout=self._ready_timeout_s
        )
        return ready


_Record = Callable[[float, dict[str, str]], None]


def _tag_keys(labels: Sequence[str]) -> Any:
    return tuple(labels)  # Ray annotates tag_keys as Tuple[str] where it means Tuple[str, ...]


class RayMetricsMirror:
    """Mirrors the ingress metrics into Ray's metrics system.

    Each node's metrics agent exports them on the node's metrics port (8080 in the
    cluster) as ``ray_<name>`` with the replica's ``deployment``/``replica`` labels: the
    per-replica series a cluster scrapes (the operator's ServiceMonitor strips the
    ``ray_`` prefix, so dashboards see the same names as ``/metrics``).

    A thread does the Ray calls that can wait, once a second: counters are summed in
    process and added then (a Ray metric call costs microseconds, and a stream adds to
    its token counter with every batch), and gauges are set again then, because Ray's
    agent drops a gauge series that was not set within two report intervals (an open
    WebSocket changes its gauge once, yet must stay visible). Histograms are recorded
    at once.
    """

    def __init__(self, refresh_s: float = 1.0) -> None:
        self._refresh_s = refresh_s
        self._gauges: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, float]] = {}
        # (id(metric), id(tags)) -> [metric, tags, sum]; the tags dict of a cached
        # series is the same object at every call.
        self._counts: dict[tuple[int, int], list[Any]] = {}
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> _Record:
        metric = serve_metrics.Counter(name, description=doc, tag_keys=_tag_keys(labels))
        counts, lock = self._counts, self._lock

        def record(value: float, tags: dict[str, str]) -> None:
            key = (id(metric), id(tags))
            with lock:
                entry = counts.get(key)
                if entry is None:
                    counts[key] = [metric, tags, value]
                else:
                    entry[2] += value

        self._start_refresher()
        return record

    def histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> _Record:
        metric = serve_metrics.Histogram(
            name, description=doc, boundaries=list(buckets), tag_keys=_tag_keys(labels)
        )
        return lambda value, tags: metric.observe(value, tags)

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> _Record:
        metric = serve_metrics.Gauge(name, description=doc, tag_keys=_tag_keys(labels))

        def record(value: float, tags: dict[str, str]) -> None:
            with self._lock:
                self._gauges[(id(metric), tuple(tags.items()))] = (metric, value)
            metric.set(value, tags)

        self._start_refresher()
        return record

    def _start_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = threading.Thread(
                target=self._refresh_forever, name="chatfleet-metrics", daemon=True
            )
            self._refresher.start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            self.flush()

    def flush(self) -> None:
        """Add the summed counters to Ray's, and set every gauge again."""
        with self._lock:
            counts = list(self._counts.values())
            self._counts.clear()
            gauges = list(self._gauges.items())
        for metric, tags, total in counts:
            metric.inc(total, dict(tags))
        for (_, tags), (metric, value) in gauges:
            metric.set(value, dict(tags))


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
@serve.ingress()
class Ingress:
    """HTTP, SSE and WebSocket front door: the FastAPI app over engine handles."""

    def __init__(
        self,
        config: AppConfig,
        engines: Mapping[str, Handle],
        router: Handle | None = None,
        classifier: Handle | None = None,
        compressor: Handle | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        _favour_the_event_loop()
        routing = HandleRouterClient(router, classifier, compressor)
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        relay = Relay(node_ip) if config.coalesce.relay else None
        # Opened (and migrated) by the app's lifespan. Sessions run in this replica:
        # their live events reach its /ws subscribers only; the database is shared.
        store = Store(config.store)
        auth = None
        if config.auth.enabled:
            # Revocations live in the store: they survive restarts and are shared.
            auth = Authenticator.from_config(config.auth, store, data_dir=config.store.data_dir)
        self._app = create_app(
            config,
            {name: HandleEngineClient(handle, relay=relay) for name, handle in engines.items()},
            router=routing if router is not None else None,
            classifier=routing if classifier is not None else None,
            compressor=routing if compressor is not None else None,
            store=store,
            auth=auth,
            metrics=Metrics(mirror=RayMetricsMirror()),
            tracer_provider=telemetry.configure_tracing(config.telemetry, component="ingress"),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def _deployment(decorated: object) -> Any:
    """A ``@serve.deployment`` class as Ray sees it (its stubs keep the bare class)."""
    return decorated


def _engine_deployment(
    model: ModelConfig, coalescing: CoalesceConfig, tracing: TelemetryConfig
) -> Any:
    return (
        _deployment(EngineDeployment)
        .options(
            name=f"engine-{model.name}",
            num_replicas=model.num_replicas,
            max_ongoing_requests=model.max_ongoing_requests,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
        )
        .bind(model, coalescing, tracing)
    )


def build_app(args: AppConfig | Mapping[str, Any] | None = None) -> Any:
    """Build the chatfleet Ray Serve application.

    ``args`` is an `AppConfig`, a mapping of its fields (serveConfigV2 ``args``),
    ``{"config_file": path}``, or nothing (environment and defaults).
    """
    if isinstance(args, AppConfig):
        config = args
    elif args and set(args) == {"config_file"}:
        config = load_config(Path(str(args["config_file"])))
    else:
        config = load_config(overrides=dict(args or {}))
    engines = {
        m.name: _engine_deployment(m, config.coalesce, config.telemetry) for m in config.models
    }
    classifier = compressor = router = None
    if config.classifier is not None:
        c = config.classifier
        classifier = (
            _deployment(ClassifierDeployment)
            .options(
                name="classifier",
                num_replicas=c.num_replicas,
                ray_actor_options={"num_cpus": c.num_cpus, "num_gpus": c.num_gpus},
            )
            .bind(c, config.telemetry)
        )
    if config.compressor is not None:
        z = config.compressor
        compressor = (
            _deployment(CompressorDeployment)
            .options(
                name="compressor",
                num_replicas=z.num_replicas,
                ray_actor_options={"num_cpus": z.num_cpus, "num_gpus": z.num_gpus},
            )
            .bind(z, config.telemetry)
        )
    if config.routing is not None:
        router = (
            _deployment(RouterDeployment)
            .options(name="router", ray_actor_options={"num_cpus": config.routing.num_cpus})
            .bind(config, classifier, compressor)
        )
    return (
        _deployment(Ingress)
        .options(
            name="ingress",
            num_replicas=config.ingress.num_replicas,
            max_ongoing_requests=config.ingress.max_ongoing_requests,
            ray_actor_options={"num_cpus": config.ingress.num_cpus},
        )
        .bind(config, engines, router, classifier, compressor)
    )
