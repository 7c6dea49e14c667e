"""Open WebSockets' objects are kept out of Python's full collections (gc.freeze), and
the heap is compacted once many of them have closed. Real uvicorn, real sockets.

A full collection walks every object it tracks with the GIL held: with thousands of
idle sockets in the ingress, that stopped the event loop for up to a second at a time.
What is asserted is where the objects are (the collector's generations or the frozen
one), not how long a collection takes.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from collections.abc import Iterator

import pytest
from tests.fakes.app_server import serving, wait_for
from websockets.asyncio.client import ClientConnection, connect

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.api._long_lived import _FREEZE_EVERY
from chatfleet.serving.api._ws_chat import _ChatConnection
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine

SOCKETS = 2 * _FREEZE_EVERY + _FREEZE_EVERY // 2


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    # gc.freeze is process-wide: leave no frozen heap to the other tests.
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


class _Cycle:
    """Garbage only the cyclic collector can reclaim (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


def _in_collector(kind: type) -> int:
    """Objects of ``kind`` the collector's generations hold (frozen ones are not listed)."""
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


async def test_open_sockets_are_frozen_and_the_heap_compacted_once_they_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = AppConfig(models=[ModelConfig(name="fake", engine="fake")], auth={"enabled": False})
    engine = LocalEngineClient(FakeEngine(config.models[0]))
    await engine.start()
    async with serving(create_app(config, {"fake": engine})) as base:
        url = base.replace("http://", "ws://") + "/ws/chat"
        garbage = _Cycle()
        freed = weakref.ref(garbage)
        sockets: list[ClientConnection] = []
        for _ in range(SOCKETS):
            ws = await connect(url, ping_interval=None)
            assert '"connection_ack"' in str(await asyncio.wait_for(ws.recv(), 30))
            sockets.append(ws)

        # Frozen every _FREEZE_EVERY sockets: only the newest ones are left for a full
        # collection to walk (without the freeze: all of them).
        assert _in_collector(_ChatConnection) <= _FREEZE_EVERY
        # While they are held (no socket opens), what is new is frozen too, every
        # second (it would otherwise fill the collector's generations again), and with
        # no collection first: at 10,000 sockets that was a pause a second, for nothing.
        collections: list[int] = []
        collect = gc.collect
        monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or collect(*a))
        late = _Cycle()
        await wait_for(functools.partial(_frozen, late))
        monkeypatch.undo()
        assert not collections
        # The price: garbage frozen with them outlives a full collection...
        del garbage, late
        gc.collect()
        assert freed() is not None

        # ...until as many sockets have closed as remain open: then the heap is
        # unfrozen, collected once and frozen again.
        for ws in sockets[: SOCKETS // 2]:
            await ws.close()
        await wait_for(lambda: _async(freed() is None), within=60)
        assert _in_collector(_ChatConnection) == 0  # the rest were frozen again

        for ws in sockets[SOCKETS // 2 :]:
            await ws.close()


async def _async(value: bool) -> bool:
    return value


async def _frozen(obj: object) -> bool:
    return not any(tracked is obj for tracked in gc.get_objects())


async def test_the_scheduled_compaction_waits_for_the_process_to_grow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A compaction unfreezes and walks the whole heap: 0.7-1.9 s at 10,000 sockets. On
    # schedule it runs only if resident memory grew by a quarter since the last one (or
    # since the first freeze): idle sockets are not stopped for nothing.
    from chatfleet.serving.api import _long_lived

    calls: list[str] = []
    resident = [100 << 20]
    monkeypatch.setattr(_long_lived, "_resident_bytes", lambda: resident[0])
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("compact"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "collect", lambda *a: 0)
    monkeypatch.setattr(_long_lived, "_COMPACT_EVERY_S", 3 * _long_lived._REFREEZE_S)

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    sockets = _long_lived.LongLivedSockets(app, freeze_every=1)  # type: ignore[arg-type]
    sockets._opened()  # the first freeze: memory then is the base
    assert sockets._refreezing is not None
    sockets._refreezing.cancel()

    def intervals(n: int) -> list[str]:
        calls.clear()
        for _ in range(3 * n):
            sockets._refreeze()
            assert sockets._refreezing is not None
            sockets._refreezing.cancel()
        return [c for c in calls if c == "compact"]

    assert intervals(2) == []  # idle: nothing grew
    resident[0] = 120 << 20  # +20 %
    assert intervals(1) == []
    resident[0] = 130 << 20  # +30 % since the first freeze
    assert intervals(1) == ["compact"]
    assert intervals(2) == []  # compared with what the compaction left: 130 MiB
    resident[0] = 170 << 20
    assert intervals(1) == ["compact"]
