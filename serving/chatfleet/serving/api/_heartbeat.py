"""`Heartbeats`: one timer per ingress replica pings every open ``/ws/chat`` socket.

A task per socket sleeping until its next ping (the first design) kept a coroutine,
a future, a timer and, while a pong was awaited, a timeout alive for each of
thousands of idle sockets: objects that outlived young garbage collections and had to
be frozen every second (`chatfleet.serving.api._long_lived`), a wake-up per socket
and ping, and work for Ray Serve's event-loop monitor, which lists every task. Here
sockets sit in a timing wheel of slots ``tick_s`` wide: each tick pings the sockets
whose ping is due and drops those whose pong is late, so a socket costs a dict entry
between pings. Pings are due ``interval_s`` after the socket answered the last one (the
first one, 0.5 to 1.5 ``interval_s`` after it opened); a pong is late ``timeout_s``
after its ping (both up to a tick later).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Protocol

__all__ = ["Heartbeats", "Peer"]

logger = logging.getLogger(__name__)

#: The wheel's slot width at most: pings due in the same tick go out together, so
#: a tick's work stays short (at 10,000 sockets and 5 s pings: 40 pings a tick).
_TICK_S = 0.02


class Peer(Protocol):
    """An open connection the heartbeat pings (hashable by identity)."""

    def ping(self) -> None:
        """Send a ping now (without waiting for the send)."""

    def pong_missed(self) -> None:
        """No pong came in time: the peer is gone."""


class Heartbeats:
    """Pings every added peer each ``interval_s``; a peer whose pong is more than
    ``timeout_s`` late is told (`Peer.pong_missed`) and removed."""

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.tick_s = min(_TICK_S, interval_s / 4, timeout_s / 4)
        # Slot number -> the peers due in it; a peer's slot, and whether it awaits a pong.
        self._slots: dict[int, dict[Peer, None]] = {}
        self._where: dict[Peer, tuple[int, bool]] = {}
        self._done = 0  # the last slot handled
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._where)

    def add(self, peer: Peer) -> None:
        """Start pinging ``peer``: the first ping 0.5 to 1.5 ``interval_s`` from now.

        The spread keeps sockets that opened together (clients reconnecting after a
        replica restarted, a load test) from being pinged together ever after: a wave
        of pings and pongs every interval, which holds up the requests that meet it.
        """
        loop = asyncio.get_running_loop()
        idle = self._timer is None
        if loop is not self._loop:  # a new event loop (tests): the old one's state goes
            if self._timer is not None:
                self._timer.cancel()
            self._slots.clear()
            self._where.clear()
            self._loop, idle = loop, True
        if idle:  # the wheel starts at the current slot, not where it stopped
            self._done = self._slot(loop.time()) - 1
        first = self.interval_s * random.uniform(0.5, 1.5)
        self._put(peer, loop.time() + first, awaiting=False)
        if idle:
            self._schedule()

    def remove(self, peer: Peer) -> None:
        where = self._where.pop(peer, None)
        if where is not None:
            slot = self._slots.get(where[0])
            if slot is not None:
                slot.pop(peer, None)
                if not slot:
                    del self._slots[where[0]]

    def pong(self, peer: Peer) -> None:
        """``peer`` answered: its next ping is ``interval_s`` from now. A pong nobody
        asked for changes nothing."""
        where = self._where.get(peer)
        if where is not None and where[1] and self._loop is not None:
            self.remove(peer)
            self._put(peer, self._loop.time() + self.interval_s, awaiting=False)

    def _slot(self, at: float) -> int:
        return math.ceil(at / self.tick_s)

    def _put(self, peer: Peer, at: float, *, awaiting: bool) -> None:
        slot = max(self._slot(at), self._done + 1)
        self._slots.setdefault(slot, {})[peer] = None
        self._where[peer] = (slot, awaiting)

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_at((self._done + 1) * self.tick_s, self._tick)

    def _tick(self) -> None:
        # A timer, not a task: nothing is left pending when the loop stops.
        assert self._loop is not None
        now = self._loop.time()
        # The timer fired at the next slot's start (the clock may read a hair before it).
        for number in range(self._done + 1, max(int(now // self.tick_s), self._done + 1) + 1):
            due = self._slots.pop(number, None)
            self._done = number
            for peer in due or ():
                where = self._where.pop(peer, None)
                if where is None:  # removed by an earlier peer's call
                    continue
                try:
                    if where[1]:
                        peer.pong_missed()
                    else:
                        self._put(peer, now + self.timeout_s, awaiting=True)
                        peer.ping()
                except Exception:  # one peer's failure must not stop the others' heartbeat
                    logger.exception("heartbeat of a WebSocket failed")
        if self._where:
            self._schedule()
        else:
            self._timer = None
