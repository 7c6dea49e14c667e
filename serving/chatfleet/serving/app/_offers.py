"""`SendsAhead`: a Ray Serve request router that, once it has chosen an engine replica
for a request, sends the request ahead to it on the token relay's link
(`chatfleet.serving.relay.Relay.offer`), so that the engine starts before Serve's own
call reaches it. `DefaultRouter` is Serve's default router with it; `AffinityRouter`
(`chatfleet.serving.app._affinity`) has it too.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Private Ray, pinned with Ray (2.60.0): Serve's default router class (its public
# import path is the string DEFAULT_REQUEST_ROUTER_PATH) and the hook below.
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from chatfleet.serving.protocol import WireRequest
from chatfleet.serving.relay import Relay, RelayAddress

__all__ = ["DefaultRouter", "SendsAhead", "send_ahead"]


class SendsAhead:
    """Mixin for a `RequestRouter`: the chosen replica gets the request on its link too.

    `_choose_replica_for_request` is where Serve's router hands the chosen replica to
    the call that sends the request, right before it sends it (on every retry too:
    a replica that refused the request gets it withdrawn).
    """

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        replica: RunningReplica = await super()._choose_replica_for_request(  # type: ignore[misc]
            pending_request, is_retry=is_retry
        )
        send_ahead(pending_request.args, replica.replica_id.unique_id)
        return replica


def send_ahead(args: list[Any], replica: str) -> bool:
    """Offer a ``generate(request, relay, key)`` call's request to ``replica`` on this
    process's relay; False for other calls, or when the replica has no link."""
    if len(args) < 3 or not isinstance(args[0], WireRequest):
        return False
    request, address, key = args[:3]
    relay = Relay.at(address) if isinstance(address, RelayAddress) else None
    if relay is None or relay.loop is None:
        return False
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is relay.loop:  # the router runs on the caller's loop (throughput mode)
        return relay.offer(replica, key, request)
    # Serve's router on a loop of its own (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1): the
    # relay is the caller's loop's; the call has registered its stream there already.
    relay.loop.call_soon_threadsafe(relay.offer, replica, key, request)
    return True


class DefaultRouter(SendsAhead, PowerOfTwoChoicesRequestRouter):
    """Serve's default router (power of two choices), sending requests ahead."""
