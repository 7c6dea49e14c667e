"""Stopping ``chatfleet serve``: signals, the drain, and no process left behind.

The sequence on SIGTERM or SIGINT (the same for both):

1. ask this machine's ingress replicas to drain (`DrainRequest`): readiness goes 503
   at once, new requests get 503 ``shutting_down``, streams in flight may finish for
   ``server.drain_timeout_s``, the rest end with their terminal event;
2. wait until every replica reports its drain over (bounded; a second signal stops
   waiting);
3. ``serve.shutdown()`` (bounded), so each replica's shutdown (the app's lifespan:
   sessions, pending writes, the store) runs, then ``ray.shutdown()``;
4. end what outlived Ray: HAProxy is a child of a Serve actor and survives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from chatfleet.serving._drain_request import DrainRequest
from chatfleet.serving.config import ServerConfig

__all__ = ["Stop", "drain_local_replicas", "leftover_processes", "stop_leftovers"]

logger = logging.getLogger(__name__)


class Stop:
    """SIGTERM and SIGINT set `requested`; a second one sets `hurried` (skip the drain)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurried = threading.Event()

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` replaces SIGTERM's with a plain exit."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.hurried.set()
        self.requested.set()


def drain_local_replicas(
    request: DrainRequest,
    server: ServerConfig,
    *,
    give_up: Callable[[], bool] = lambda: False,
    progress: Callable[[str], None] = logger.info,
) -> bool:
    """Ask the ingress replicas on this machine to drain; True when all reported done."""
    waiting = request.pending()
    if not waiting:
        return True
    progress(
        "draining: no new requests; streams in flight may finish for up to"
        f" {server.drain_timeout_s:g} s (Ctrl-C again to stop at once)..."
    )
    request.request()
    done = request.wait(server.shutdown_grace_s, give_up=give_up)
    if not done:
        progress(f"drain incomplete on replicas {', '.join(request.pending())}; stopping anyway")
    return done


def run_processes() -> list[Any]:
    """This process's descendants now (Ray's daemons, workers and their HAProxy)."""
    import psutil  # type: ignore[import-untyped]

    with contextlib.suppress(psutil.Error):
        return list(psutil.Process(os.getpid()).children(recursive=True))
    return []


def leftover_processes(processes: list[Any]) -> list[Any]:
    import psutil

    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def stop_leftovers(processes: list[Any], grace_s: float = 5.0) -> list[str]:
    """Terminate (then kill) what of ``processes`` outlived ``ray.shutdown()``; their names."""
    import psutil

    deadline = time.monotonic() + grace_s
    while leftover_processes(processes) and time.monotonic() < deadline:
        time.sleep(0.1)  # Ray's own shutdown reaps most of them within a moment
    left = leftover_processes(processes)
    names = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            names.append(process.name())
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return names


def shutdown_serve(timeout_s: float) -> bool:
    """``serve.shutdown()`` within ``timeout_s`` (False: it was still going)."""
    from ray import serve

    def shutdown() -> None:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]

    thread = threading.Thread(target=shutdown, name="serve-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()
