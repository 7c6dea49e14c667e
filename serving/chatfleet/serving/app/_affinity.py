"""`AffinityRouter`: the Ray Serve request router of an engine deployment that sends a
request to the replica holding its conversation's KV cache.

Each request carries an affinity key (``GenerationRequest.affinity_key``, set by the
ingress: `chatfleet.serving.api`'s ``affinity_key``; the `WireRequest` the handle call
sends has it beside the request's JSON). Rendezvous hashing ranks the live
replicas for a key: every replica scores ``hash(key, replica id)`` and the highest wins.
It needs no shared state between ingress replicas (each ranks alike), and a replica
that joins or leaves moves only the keys it wins or held (about 1/n of them), where
``hash(key) % n`` would move most. When the key's replica is full (its
``max_ongoing_requests``; or, with ``max_imbalance``, that much busier than the least
loaded), the request goes to the least loaded with room of two other replicas and
the key's own (Serve's default is power of two choices; keeping the key's replica in
the running means a request waiting while all are full takes whichever frees first).
A request without a key is routed by Serve's default alone. The chosen replica gets
the request ahead on its token relay link (`SendsAhead`).

Every routed request with a key is counted in ``chatfleet_affinity_total{model,
outcome}``, outcome ``hit`` (its key's replica) or ``miss``, through Ray's metrics
(the router runs in the process that calls the handle: an ingress replica).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

from ray.serve import metrics as serve_metrics
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from chatfleet.serving.app._offers import SendsAhead
from chatfleet.serving.protocol import WireRequest

__all__ = ["AffinityRouter", "rendezvous_order"]

# Requests whose key's replica is remembered until they are routed: a request withdrawn
# before that is forgotten once this many came after it.
_MAX_PENDING = 10_000


def _score(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\x1f{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """``replicas`` (ids) from the one ``key`` prefers most to the one it prefers least."""
    return sorted(replicas, key=lambda replica: _score(key, replica), reverse=True)


def _affinity_key(request: PendingRequest | None) -> str:
    if request is None:
        return ""
    for arg in request.args:
        if isinstance(arg, WireRequest):
            return arg.affinity_key
    return ""


def _two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(replicas, min(2, len(replicas)))


class AffinityRouter(SendsAhead, RequestRouter):
    """Routes a request to its affinity key's replica, or the less loaded of two others.

    Serve builds one per deployment handle and calls `initialize_state` with
    ``request_router_kwargs``; `outcomes` counts hits and misses (as the metric does).
    """

    def initialize_state(self, model: str = "", max_imbalance: int | None = None) -> None:  # type: ignore[override]
        self._model = model
        self._max_imbalance = max_imbalance
        # internal request id -> the replica its key preferred, until Serve routes it.
        self._preferred: OrderedDict[str, ReplicaID] = OrderedDict()
        self.outcomes: Counter[str] = Counter()
        tag_keys: Any = ("model", "outcome")  # Ray annotates Tuple[str] for Tuple[str, ...]
        self._outcome_metric = serve_metrics.Counter(
            "chatfleet_affinity_total",
            description="Requests routed by affinity key: outcome 'hit' went to the key's"
            " replica, 'miss' to another (it was full or too busy).",
            tag_keys=tag_keys,
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every pass considers every replica: let Serve back off between passes.
            pending_request.routing_context.should_backoff = True
        key = _affinity_key(pending_request)
        if not key or not candidate_replicas:
            return [_two_choices(candidate_replicas)]
        assert pending_request is not None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        preferred = by_id[rendezvous_order(key, by_id)[0]]
        self._remember(pending_request, preferred.replica_id)
        others = [r for r in candidate_replicas if r is not preferred]
        if self._too_busy(preferred, others):
            # The least loaded with room; the key's replica stays in the running, so a
            # request waiting while every replica is full takes whichever frees first.
            return [[*_two_choices(others), preferred]]
        # Serve tries the ranks in order: the key's replica, unless it is full.
        return [[preferred], _two_choices(others)]

    def _too_busy(self, preferred: RunningReplica, others: list[RunningReplica]) -> bool:
        """Whether ``preferred`` is full or, with ``max_imbalance``, too busy, as far as
        this router's count of its requests knows; Serve's probe finds it otherwise."""
        cache = self._replica_queue_len_cache
        load = cache.get(preferred.replica_id)
        if load is None or not others:
            return False
        if load >= preferred.max_ongoing_requests:
            return True  # skips a probe that would say so
        if self._max_imbalance is None:
            return False
        least = min(cache.get(r.replica_id) or 0 for r in others)  # unknown: idle
        return load - least >= self._max_imbalance

    def _remember(self, request: PendingRequest, replica: ReplicaID) -> None:
        request_id = request.metadata.internal_request_id
        self._preferred[request_id] = replica
        self._preferred.move_to_end(request_id)
        while len(self._preferred) > _MAX_PENDING:
            self._preferred.popitem(last=False)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        # Serve calls this once the replica accepted the request: always, but through
        # Ray Client (no rejection protocol there), where nothing would be counted.
        preferred = self._preferred.pop(pending_request.metadata.internal_request_id, None)
        if preferred is None:
            return
        outcome = "hit" if preferred == replica_id else "miss"
        self.outcomes[outcome] += 1
        self._outcome_metric.inc(1, {"model": self._model, "outcome": outcome})
