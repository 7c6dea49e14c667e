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
from collections.abc import AsyncGenerator, Callable
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
    # Private Ray (2.60): DeploymentHandle._router (a SingletonThreadRouter or
    # CurrentLoopRouter) -> _asyncio_router (AsyncioRouter) -> request_router
    # (RequestRouter) -> curr_replicas. Serve has no public replica list on a handle
    # (ray-project/ray#15312 asked for `handle.replicas()`; closed without it). When the
    # chain moves, this answers None and a model that scales to zero is taken as
    # loading whenever its request waits, so the notice degrades, never the request.
    try:
        router = handle._router._asyncio_router.request_router  # type: ignore[union-attr]
        return len(router.curr_replicas) if router is not None else 0
    except AttributeError:
        return None


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
    ) -> AsyncGenerator[ModelLoading, None]:
        """Return once a replica took ``response``'s request, first yielding one
        `ModelLoading` if it waits while ``replicas()`` run none; `ModelBusy` or
        `ModelStarting` if none took it in time, or too many wait already (the request
        is then withdrawn)."""
        started = time.perf_counter()
        queued = None if self._metrics is None else self._metrics.queued_requests.labels(self.model)
        if queued is not None:
            queued.inc()
        # Private Ray: the future a streaming handle call resolves once the router
        # assigned it to a replica. Its public iteration waits for that and then for
        # the first message, which would bound the model's time to first token too.
        # This would go if Serve offered a timeout on assignment.
        assignment = asyncio.ensure_future(response._fetch_future_result_async())
        loading = False
        try:
            done, _ = await asyncio.wait({assignment}, timeout=LOADING_NOTICE_AFTER_S)
            if not done:
                running = replicas()
                loading = running == 0 if running is not None else self.scales_to_zero
                if loading:
                    yield ModelLoading()
            bound = self.cold_start_s if loading else self.max_wait_s
            remaining = max(0.0, bound - (time.perf_counter() - started))
            await asyncio.wait_for(assignment, remaining)
        except BackPressureError:
            raise self._refuse("queue_full", "too many requests waiting") from None
        except TimeoutError:
            # wait_for cancelled the assignment; cancel() marks the call withdrawn.
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
            self._metrics.queue_wait.labels(self.model).observe(time.perf_counter() - started)

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
