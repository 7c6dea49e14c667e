"""Asking the ingress replicas on this machine (or pod) to drain, through files.

Ray Serve gives a replica no hook at the start of its shutdown: it waits for the
requests in flight (up to ``graceful_shutdown_timeout_s``), then calls ``__del__``,
so a replica cannot refuse new work or end its streams cleanly on its own. The drain
is therefore requested from outside, before Serve stops anything: by ``chatfleet
serve`` on SIGTERM/SIGINT, and by ``chatfleet drain`` as a Kubernetes preStop hook.

Files rather than a Serve call: a deployment handle reaches one replica, not each,
and a pod's preStop hook must drain that pod's replicas only (its ``/tmp`` is its
own). In ``folder``: ``<replica>.serving`` per ingress replica started here (its process id),
``request`` once a drain is asked for, ``<replica>.draining`` once that replica refuses
new work (each looks for the request every 0.2 s, so replicas begin a moment apart),
``<replica>.drained`` once its drain is over (every stream ended with its terminal event).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DrainRequest"]

_SERVING = ".serving"
_DRAINING = ".draining"
_DRAINED = ".drained"


def _running(replica: str) -> bool:
    """Whether the replica (its process id) still runs on this machine."""
    if not replica.isdigit():
        return True  # not a process id: can't tell, so wait for it
    try:
        os.kill(int(replica), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


class DrainRequest:
    """The drain files of the ingress replicas serving ``port`` on this machine."""

    def __init__(self, port: int, root: Path | None = None) -> None:
        self.folder = (root or Path(tempfile.gettempdir())) / f"chatfleet-drain-{port}"

    def clear(self) -> None:
        """Forget an earlier run's files (before this run's replicas start)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def register(self, replica: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{replica}{_SERVING}").touch()

    def requested(self) -> bool:
        return (self.folder / "request").exists()

    def request(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "request").touch()

    def draining(self, replica: str) -> None:
        (self.folder / f"{replica}{_DRAINING}").touch()

    def drained(self, replica: str) -> None:
        (self.folder / f"{replica}{_DRAINED}").touch()

    def pending(self) -> list[str]:
        """Replicas registered here, still running, whose drain is not over."""
        return self._without(_DRAINED)

    def not_draining(self) -> list[str]:
        """Replicas registered here, still running, that have not begun to drain."""
        return self._without(_DRAINING)

    def _without(self, suffix: str) -> list[str]:
        if not self.folder.is_dir():
            return []
        serving = {p.name.removesuffix(_SERVING) for p in self.folder.glob(f"*{_SERVING}")}
        done = {p.name.removesuffix(suffix) for p in self.folder.glob(f"*{suffix}")}
        # A replica that died (or that Serve replaced) left its file: don't wait for it.
        return sorted(r for r in serving - done if _running(r))

    def wait(
        self,
        timeout_s: float,
        *,
        give_up: Callable[[], bool] = lambda: False,
        poll_s: float = 0.2,
    ) -> bool:
        """Until every registered replica has drained (True), ``timeout_s`` or ``give_up()``."""
        deadline = time.monotonic() + timeout_s
        while self.pending():
            if time.monotonic() >= deadline or give_up():
                return False
            time.sleep(poll_s)
        return True
