"""What every chatfleet replica shares: how long it drains, and its GIL hand-over."""

from __future__ import annotations

import sys

# Replicas drain for this long on shutdown or redeploy; streams past it are cut.
_GRACEFUL_SHUTDOWN_S = 10.0


def _favour_the_event_loop() -> None:
    """Hand the GIL over every 0.5 ms instead of Python's 5 ms.

    A replica's asyncio loop shares the GIL with Ray's and gRPC's threads; at the
    default interval every wake-up of the loop can wait up to 5 ms behind them, and a
    first token crosses several such waits. At 128 paced streams (bench/gateway.py)
    this halved the time to first token (80 -> 39 ms p50).
    """
    # Process-wide: this sets the interval for every thread of the replica's worker
    # process, Ray's included. It works around Ray running its own Python threads (and
    # gRPC's) in the process, under the one GIL the replica's asyncio loop needs.
    # Free-threaded CPython (no GIL) would remove it; drop it too if bench/gateway.py
    # stops measuring a gain over the default interval.
    sys.setswitchinterval(0.0005)
