"""Admission at the ingress: a request waits for a replica of its model, bounded.

Each engine replica admits ``max_ongoing_requests``; beyond that, Serve's router in the
ingress replica holds the request until a replica has room. That wait is bounded twice,
and both bounds end in the same `ModelBusy` (429, ``Retry-After``): in count by Serve
(``max_queued_requests``: it raises ``BackPressureError`` at once) and in time here
(``admission.max_queue_wait_s``, or the cold-start bound of a model scaled to zero).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentResponseGenerator

from chatfleet.serving.api import Metrics
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.errors import ModelBusy


class EngineAdmission:
    """How long a request for one model may wait for a replica, and what is recorded."""

    def __init__(self, model: ModelConfig, metrics: Metrics | None = None) -> None:
        self.model = model.name
        self.max_wait_s = model.queue_wait_s()
        self.retry_after_s = model.admission.retry_after_s
        self.scales_to_zero = model.autoscaling is not None and model.autoscaling.min_replicas == 0
        self._metrics = metrics

    async def wait(self, response: DeploymentResponseGenerator[Any]) -> None:
        """Return once a replica took ``response``'s request; `ModelBusy` if none did in
        time or too many wait already (the request is then withdrawn)."""
        started = time.perf_counter()
        queued = None if self._metrics is None else self._metrics.queued_requests.labels(self.model)
        if queued is not None:
            queued.inc()
        try:
            # Private Ray: the future a streaming handle call resolves once the router
            # assigned it to a replica. Its public iteration waits for that and then for
            # the first message, which would bound the model's time to first token too.
            # This would go if Serve offered a timeout on assignment.
            await asyncio.wait_for(response._fetch_future_result_async(), self.max_wait_s)
        except BackPressureError:
            raise self._refuse("queue_full", "too many requests waiting") from None
        except TimeoutError:
            # wait_for cancelled the assignment; cancel() marks the call withdrawn.
            response.cancel()  # type: ignore[no-untyped-call]
            raise self._refuse("wait_timeout", f"waited {self.max_wait_s:g} s") from None
        except asyncio.CancelledError:
            # The client went away while waiting (wait_for withdrew the assignment).
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
