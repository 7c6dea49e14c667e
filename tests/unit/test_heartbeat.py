"""The replica's heartbeat wheel (`Heartbeats`) and the token watch's callbacks."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatfleet.serving.api._heartbeat import Heartbeats
from chatfleet.serving.auth._revocation import MemoryRevocationStore
from chatfleet.serving.auth._watch import Ending, TokenWatch


class Peer:
    def __init__(self, hb: Heartbeats, *, answers: bool = True, fails: bool = False) -> None:
        self.hb = hb
        self.answers = answers
        self.fails = fails
        self.pings: list[float] = []
        self.missed: list[float] = []

    def ping(self) -> None:
        self.pings.append(time.monotonic())
        if self.fails:
            raise RuntimeError("send failed")
        if self.answers:
            asyncio.get_running_loop().call_soon(self.hb.pong, self)

    def pong_missed(self) -> None:
        self.missed.append(time.monotonic())


async def test_pings_each_interval_and_drops_a_peer_whose_pong_is_late() -> None:
    hb = Heartbeats(interval_s=0.1, timeout_s=0.2)
    live, silent, broken = Peer(hb), Peer(hb, answers=False), Peer(hb, fails=True)
    started = time.monotonic()
    for peer in (live, silent, broken):
        hb.add(peer)
    await asyncio.sleep(0.75)
    # Live: a ping about every 0.1 s (each one interval after the last pong), never early;
    # the first one 0.05 to 0.15 s after it was added (sockets that open together spread).
    assert 4 <= len(live.pings) <= 9
    assert live.pings[0] - started >= 0.05
    assert all(b - a >= 0.1 for a, b in zip(live.pings, live.pings[1:], strict=False))
    assert not live.missed
    # Silent: one ping, then dropped once the timeout passed, and not pinged again.
    assert len(silent.pings) == 1
    assert len(silent.missed) == 1
    assert silent.missed[0] - silent.pings[0] >= 0.2
    # A peer whose ping raised stopped nobody else's heartbeat (it is dropped later too).
    assert len(broken.pings) == 1
    assert len(hb) == 1  # live only


async def test_a_removed_peer_is_never_pinged_and_an_empty_wheel_has_no_timer() -> None:
    hb = Heartbeats(interval_s=0.05, timeout_s=0.05)
    gone, stays = Peer(hb), Peer(hb)
    hb.add(gone)
    hb.add(stays)
    hb.remove(gone)
    await asyncio.sleep(0.2)
    assert not gone.pings
    assert stays.pings
    hb.remove(stays)
    await asyncio.sleep(0.05)
    assert hb._timer is None  # nothing left: no wake-ups
    pinged = len(stays.pings)
    hb.add(stays)  # it starts again from the current time
    await asyncio.sleep(0.2)
    assert len(stays.pings) > pinged


async def test_an_unasked_pong_changes_nothing() -> None:
    hb = Heartbeats(interval_s=0.2, timeout_s=0.05)
    peer = Peer(hb, answers=False)
    hb.add(peer)
    hb.pong(peer)  # not awaited: no ping went out yet
    await asyncio.sleep(0.1)
    assert not peer.pings
    await asyncio.sleep(0.25)
    assert len(peer.pings) == 1
    assert len(peer.missed) == 1


@pytest.mark.parametrize("how", ["expired", "revoked"])
async def test_the_token_watch_calls_back_once_and_stops_cleanly(how: Ending) -> None:
    watch = TokenWatch(MemoryRevocationStore(), poll_s=60)
    ends: list[Ending] = []
    expires_at = time.time() + (0.1 if how == "expired" else 60)
    watch.notify("a", expires_at, ends.append)
    stop_b = watch.notify("b", time.time() + 0.1, ends.append)
    stop_b()  # stopped: never called back
    assert watch.watched == 1
    if how == "revoked":
        watch.revoked("a")
        watch.revoked("a")
    await asyncio.sleep(0.2)
    assert ends == [how]
    assert watch.watched == 0
    assert await watch.until_invalid("c", time.time() + 0.05) == "expired"
    assert watch.watched == 0
