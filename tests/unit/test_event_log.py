"""`EventLog` over a real SQLite store: what a reconnecting client is replayed while a
batch is being written, and batches of one session committed in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from chatfleet.serving.api._event_log import EventLog
from chatfleet.serving.api._events import EventHub
from chatfleet.serving.store import Store
from chatfleet.serving.store._events import NewEvent


class GatedStore(Store):
    """A store whose first event write waits for ``gate`` (a slow database)."""

    gate: asyncio.Event
    writing: asyncio.Event

    async def add_events(self, events: Sequence[NewEvent]) -> None:
        if not self.writing.is_set():
            self.writing.set()
            await self.gate.wait()
        await super().add_events(events)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    s = GatedStore.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    s.gate, s.writing = asyncio.Event(), asyncio.Event()
    await s.start()
    yield s
    s.gate.set()
    await s.close()


def emit(log: EventLog, n: int) -> None:
    for i in range(n):
        log.emit("llm.response", owner="x", session_id="s", delta=f"t{i}")


async def test_a_batch_being_written_is_replayed(store: GatedStore) -> None:
    log = EventLog(lambda: store, EventHub())
    emit(log, 3)
    flushing = asyncio.create_task(log.flush())
    await asyncio.wait_for(store.writing.wait(), 10)
    emit(log, 2)  # while the first batch is on its way

    replayed = await log.replay("s", 0)

    assert [e.seq for e in replayed] == [1, 2, 3, 4, 5]
    store.gate.set()
    await flushing
    await log.flush()
    assert [e.seq for e in await log.replay("s", 2)] == [3, 4, 5]
    assert [e.seq for e in await store.events_after("s")] == [1, 2, 3, 4, 5]


async def test_batches_are_written_one_after_the_other(store: GatedStore) -> None:
    log = EventLog(lambda: store, EventHub())
    emit(log, 2)
    first = asyncio.create_task(log.flush())
    await asyncio.wait_for(store.writing.wait(), 10)
    emit(log, 2)
    second = asyncio.create_task(log.flush())
    await asyncio.sleep(0.2)
    # It waits for the first batch: written beside it, it would commit first.
    assert not second.done()
    store.gate.set()
    await asyncio.gather(first, second)
    stored = await store.events_after("s")
    assert [e.seq for e in stored] == [1, 2, 3, 4]
    assert [e.id for e in stored] == sorted(e.id for e in stored)
