"""The usage meter's writes to a real store: nothing counted is lost at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._usage import UsageMeter
from chatfleet.serving.protocol import Chunk, GenerationRequest, Usage
from chatfleet.serving.store import Store


def _answer(prompt: int, completion: int) -> Answer:
    async def batches() -> AsyncGenerator[list[Chunk], None]:
        yield [Chunk("text", "hi", finish_reason="stop", usage=Usage(prompt, completion))]

    return Answer(GenerationRequest(model="fake", messages=[]), batches())


async def test_drain_waits_for_the_write_in_flight_then_writes_the_rest(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.from_url(store_url)
    await store.start()
    try:
        meter = UsageMeter(store, None, flush_s=0.01)
        write = store.record_usage_batch
        in_flight, go_on = asyncio.Event(), asyncio.Event()

        async def slow_first_write(rows: list[tuple[object, ...]]) -> None:
            if not in_flight.is_set():  # the first write waits, as on a slow database
                in_flight.set()
                await go_on.wait()
            await write(rows)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "record_usage_batch", slow_first_write)
        first = _answer(3, 5)
        meter.meter(first, "alice")
        await first.collect()
        await asyncio.wait_for(in_flight.wait(), 30)  # its batch is taken, being written
        second = _answer(7, 11)
        meter.meter(second, "alice")
        await second.collect()  # counted while the first is written

        drained = asyncio.create_task(meter.drain())
        await asyncio.sleep(0.1)
        go_on.set()
        await asyncio.wait_for(drained, 30)

        [row] = await store.usage(owner="alice")
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 10, 16)
    finally:
        await store.close()
