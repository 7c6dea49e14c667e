"""Admission at the ingress: a request waits for a replica of its model, bounded.

Each engine replica admits ``max_ongoing_requests``; beyond that, Serve's router in the
ingress replica holds the request until a replica has room. That wait is bounded twice,
and both bounds end in the same `ModelBusy` (429, ``Retry-After``): in count by Serve
(``max_queued_requests``: it raises ``BackPressureError`` at once) and in time here
(``admission.max_queue_wait_s``).

A request that waits while no replica of its model runs (scaled to zero, or every
replica still starting) waits for a cold start instead: the client is told at once
(`ModelLoading`, which `Gateway.open` turns into an SSE comment or a ``loading`` event),
the bound is ``autoscaling.cold_start_timeout_s``, and passing it is `ModelStarting`
(503, ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatfleet.serving.api import Metrics, ModelLoading
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.errors import ModelBusy, ModelStarting

#: A request still not on a replica after this long, while none runs, is waiting for a
#: cold start. Long enough for a fresh handle to learn its replicas (it starts with
#: none), short against a model's load time.
LOADING_NOTICE_AFTER_S = 0.3


def running_replicas(handle: DeploymentHandle[Any]) -> int | None:
    """Replicas of ``handle``'s deployment its router can send to; ``None`` if unknown.

    Cheap: the router's own replica set, kept current by Serve's long poll (no call to
    the controller, unlike ``serve.status()``).
    """
    replicas = _router_replicas(handle)
    return None if replicas is None else len(replicas)


def sole_replica(handle: DeploymentHandle[Any]) -> str | None:
    """The id of the one replica ``handle``'s router can send to, when it knows exactly
    one (and so has no choice to make); None otherwise, or when unknown."""
    replicas = _router_replicas(handle)
    if replicas is None or len(replicas) != 1:
        return None
    return str(next(iter(replicas)).unique_id)


def _router_replicas(handle: DeploymentHandle[Any]) -> Mapping[Any, Any] | None:
    # Private Ray (2.60): DeploymentHandle._router (a SingletonThreadRouter or
    # CurrentLoopRouter) -> _asyncio_router (AsyncioRouter) -> request_router
    # (RequestRouter) -> curr_replicas (by ReplicaID). Serve has no public replica list
    # on a handle (ray-project/ray#15312 asked for `handle.replicas()`; closed without
    # it). When the chain moves, this answers None: a model that scales to zero is then
    # taken as loading whenever its request waits, and every request makes its handle
    # call; the notice and the shortcut degrade, never the request.
    try:
        router = handle._router._asyncio_router.request_router  # type: ignore[union-attr]
        return router.curr_replicas if router is not None else {}
    except AttributeError:
        return None


async def settled(
    assignment: asyncio.Future[Any], started: asyncio.Future[Any] | None, wait_s: float
) -> bool:
    """Whether, within ``wait_s``, ``assignment`` settled (either way) or ``started``
    succeeded; a ``started`` that fails says nothing, and the assignment decides.

    Why ``started`` can come first: a streaming handle call in throughput mode is a
    gRPC call, and Serve's router counts it assigned only when the replica's answer
    (``accepted`` in the call's initial metadata, sent before the replica runs the user
    generator) is back in the ingress (ray/serve/_private/router.py
    ``_route_and_send_request_once`` awaits ``result.get_rejection_response()``;
    replica.py ``HandleRequestWithRejectionStreaming``). That answer crosses gRPC's own
    threads in both processes (event engine, completion-queue poller) before it reaches
    the ingress's loop, while the engine's batches on the token relay go loop to loop
    over one TCP socket. On a loaded machine each thread hop waits for a core: at 32
    streams on 2 busy cores the answer took 1.7-7.7 ms (p50) and 7-14 ms (p90) from the
    replica to the ingress's loop, while the first batch left the engine 0.3 ms after
    it started and crossed the relay in 1.2 ms (p50; 4.4 ms p90).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    waiting: set[asyncio.Future[Any]] = {assignment} if started is None else {assignment, started}
    while not assignment.done():
        if started is not None and started.done():
            if not started.cancelled() and started.exception() is None:
                return True
            waiting.discard(started)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    return True


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s outcome seen: its error, if any, reaches the reader elsewhere."""
    if not future.cancelled():
        future.exception()


class EngineAdmission:
    """How long a request for one model may wait for a replica, and what is recorded."""

    def __init__(self, model: ModelConfig, metrics: Metrics | None = None) -> None:
        self.model = model.name
        self.max_wait_s = model.admission.max_queue_wait_s
        scaling = model.autoscaling
        self.cold_start_s = max(
            self.max_wait_s, scaling.cold_start_timeout_s if scaling else self.max_wait_s
        )
        self.retry_after_s = model.admission.retry_after_s
        self.scales_to_zero = scaling is not None and scaling.min_replicas == 0
        self._metrics = metrics

    async def admitted(
        self,
        response: DeploymentResponseGenerator[Any],
        replicas: Callable[[], int | None] = lambda: None,
        started: asyncio.Future[Any] | None = None,
        queued_until: asyncio.Future[Any] | None = None,
    ) -> AsyncGenerator[ModelLoading, None]:
        """Return once a replica took ``response``'s request, first yielding one
        `ModelLoading` if it waits while ``replicas()`` run none; `ModelBusy` or
        `ModelStarting` if none took it in time, or too many wait already (the request
        is then withdrawn).

        ``started`` succeeding (the request's first batch, read from the token relay)
        also proves a replica took it: the replica accepts before user code runs. Under
        load the engine's first batch comes in before Serve's word that it accepted
        (see `settled`), and a client should not wait for the later of the two.

        ``queued_until``: the request counts as queued until that settles rather than
        until a replica takes it: a request the replica declined on the link (full by
        its own count) is taken by Serve's router at once, then waits in the replica."""
        began = time.perf_counter()
        queued = None if self._metrics is None else self._metrics.queued_requests.labels(self.model)
        if queued is not None:
            queued.inc()
            if queued_until is not None:
                gauge = queued
                queued_until.add_done_callback(lambda _: gauge.dec())
                queued = None
        # Private Ray: the future a streaming handle call resolves once the router
        # assigned it to a replica. Its public iteration waits for that and then for
        # the first message, which would bound the model's time to first token too.
        # This would go if Serve offered a timeout on assignment.
        assignment = asyncio.ensure_future(response._fetch_future_result_async())
        loading = False
        try:
            if not await settled(assignment, started, LOADING_NOTICE_AFTER_S):
                running = replicas()
                loading = running == 0 if running is not None else self.scales_to_zero
                if loading:
                    yield ModelLoading()
            bound = self.cold_start_s if loading else self.max_wait_s
            remaining = max(0.0, bound - (time.perf_counter() - began))
            if not await settled(assignment, started, remaining):
                raise TimeoutError
            if assignment.done():
                assignment.result()  # its refusal (BackPressureError), if it was one
            else:
                # Admitted by the first batch: the assignment resolves soon after (the
                # relay's watcher awaits the same call); only its outcome is left.
                assignment.add_done_callback(_retrieve)
        except BackPressureError:
            raise self._refuse("queue_full", "too many requests waiting") from None
        except TimeoutError:
            # cancel() marks the call withdrawn.
            assignment.cancel()
            response.cancel()  # type: ignore[no-untyped-call]
            if loading:
                raise self._not_started() from None
            raise self._refuse("wait_timeout", f"waited {self.max_wait_s:g} s") from None
        except BaseException:
            # The client went away while waiting (or the consumer closed us at the
            # notice): withdraw the assignment.
            assignment.cancel()
            response.cancel()  # type: ignore[no-untyped-call]
            raise
        finally:
            if queued is not None:
                queued.dec()
        if self._metrics is not None:
            self._metrics.queue_wait.labels(self.model).observe(time.perf_counter() - began)

    def refused_by_replica(self) -> None:
        """A replica that Serve's router found room in was full by its own count (it
        also runs requests sent on a link alone) and refused after the same wait."""
        if self._metrics is not None:
            self._metrics.rejected_requests.labels(self.model, "wait_timeout").inc()

    def _refuse(self, reason: str, why: str) -> ModelBusy:
        if self._metrics is not None:
            self._metrics.rejected_requests.labels(self.model, reason).inc()
        return ModelBusy(
            f"model {self.model} is at capacity ({why}); retry in {self.retry_after_s} s",
            retry_after=self.retry_after_s,
        )

    def _not_started(self) -> ModelStarting:
        if self._metrics is not None:
            self._metrics.rejected_requests.labels(self.model, "cold_start_timeout").inc()
        return ModelStarting(
            f"model {self.model} did not start within {self.cold_start_s:g} s;"
            f" retry in {self.retry_after_s} s",
            retry_after=self.retry_after_s,
        )
