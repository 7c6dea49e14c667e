"""Session events benchmark: what persisting every ``/ws`` event costs per token.

Run from the repository root::

    .venv/bin/python bench/session_events.py                 # SQLite, 20,000 events
    .venv/bin/python bench/session_events.py --url postgresql+asyncpg://...

A session's events are numbered and handed to the replica's subscribers at once
(`EventLog.emit`: encode the frame, append it to the unwritten list, queue it for
each subscriber) and written to the store in batches (`EventLog.flush`, one INSERT
per batch, every ``store.events_flush_s``). Reported: CPU per event of ``emit``
with 0 and 10 subscribers (what a token costs on the hot path, an event being one
coalesced batch of tokens), and per event of ``flush`` at batch sizes 1, 16 and 256
(what the background writer costs), each on its own with nothing else running.
Also: the delay from ``emit`` on one replica to delivery on another following the
same store (`EventLog.follow`, polling every 0.1 s; LISTEN/NOTIFY on PostgreSQL).

It prints figures only; it asserts nothing about timings.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (bench/operator.py): keep it off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]

import argparse
import asyncio
import statistics
import tempfile
import time

from chatfleet.serving.api._event_log import EventLog
from chatfleet.serving.api._events import EventHub
from chatfleet.serving.store import Store


async def emit_cost(store: Store, events: int, subscribers: int) -> float:
    hub = EventHub(queue_size=events + 10)
    for _ in range(subscribers):
        hub.subscribe(sees=None)
    log = EventLog(lambda: store, hub)
    started = time.process_time()
    for i in range(events):
        log.emit(
            "llm.response",
            {"content": "tok " * 16, "is_complete": False, "is_final": False},
            owner="bench",
            session_id=f"s{i % 50}",
            delta="tok " * 16,
            is_complete=False,
            is_final=False,
        )
    return (time.process_time() - started) / events


async def flush_cost(store: Store, events: int, batch: int) -> float:
    log = EventLog(lambda: store, EventHub())
    started = time.perf_counter()
    for i in range(0, events, batch):
        for j in range(i, min(i + batch, events)):
            log.emit("llm.response", owner="bench", session_id=f"f{batch}-{j % 50}", delta="x")
        await log.flush()
    return (time.perf_counter() - started) / events


async def follow_delay(url: str, samples: int) -> list[float]:
    config = {"events_poll_s": 0.1, "events_flush_s": 0.05}
    writer, reader = Store.from_url(url, **config), Store.from_url(url, **config)
    await writer.start()
    await reader.start()
    writing, reading = EventLog(lambda: writer, EventHub()), EventLog(lambda: reader, EventHub())
    subscriber = reading.hub.subscribe(sees=None)
    await writing.start(0.05, 0.1)
    await reading.start(0.05, 0.1)
    delays = []
    try:
        for i in range(samples):
            sent = time.perf_counter()
            writing.emit("llm.response", owner="bench", session_id="delay", n=i)
            await asyncio.wait_for(subscriber.queue.get(), 10)
            delays.append(time.perf_counter() - sent)
            await asyncio.sleep(0.02)
    finally:
        await writing.close()
        await reading.close()
        await writer.close()
        await reader.close()
    return delays


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="Store URL (default: a temporary SQLite file).")
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite+aiosqlite:///{tmp}/bench.db"
        store = Store.from_url(url)
        await store.start()
        print(f"store: {store.dialect}, {args.events} events")
        for subscribers in (0, 10):
            cost = await emit_cost(store, args.events, subscribers)
            print(f"emit, {subscribers:2d} subscribers: {cost * 1e6:6.1f} us CPU per event")
        for batch in (1, 16, 256):
            cost = await flush_cost(store, min(args.events, 2000 * batch), batch)
            print(f"flush, batches of {batch:3d}: {cost * 1e6:8.1f} us per event")
        await store.close()
        delays = await follow_delay(url, 50)
        print(
            f"another replica gets an event after: p50 {statistics.median(delays) * 1e3:.0f} ms,"
            f" max {max(delays) * 1e3:.0f} ms (flush 0.05 s, poll 0.1 s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
