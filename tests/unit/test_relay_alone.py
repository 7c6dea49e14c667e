"""Requests run on the token relay's link alone, without a handle call (`Relay.run`):
the engine answers on the link and says there how the request ended (its count, its
error, or that it is full); a reader that leaves stops it; the replica counts what it
admitted, so handle calls that find it full wait for room (bounded); a stopping replica
takes no new request and lets the running ones end. A real relay and engine replica
class on loopback, the fake engine, no Ray."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from tests.fakes.app_server import wait_for
from tests.unit.test_relay_ahead import REPLICA, close, linked, slow_down, text, wire

from chatfleet.serving.errors import EngineError, ModelBusy
from chatfleet.serving.relay import Declined, Relay


def settled(engine: Any) -> bool:
    return engine._stats["active"] == 0 and engine._occupied == 0 and len(engine._early) == 0


def run(relay: Relay) -> Any:
    key = uuid.uuid4().hex
    stream = relay.run(REPLICA, key, wire())
    assert stream is not None
    return stream


async def test_a_request_run_on_the_link_alone_streams_and_ends_there() -> None:
    relay, _, engine, expected = await linked()
    answer = [b async for b in run(relay)]
    assert text(answer) == expected
    await wait_for(lambda: asyncio.sleep(0, settled(engine)))
    assert engine._stats["alone"] == 1 and engine._stats["completed"] == 2
    assert relay.stats["run"] == 1 and not relay._streams
    await close(relay, engine)


async def test_no_link_to_the_replica_means_no_run() -> None:
    relay, _, engine, _ = await linked()
    assert relay.run("replica-without-a-link", uuid.uuid4().hex, wire()) is None
    assert not relay._streams
    await close(relay, engine)


async def test_a_full_replica_declines_and_starts_nothing() -> None:
    relay, _, engine, _ = await linked()
    engine._admitted = 0
    with pytest.raises(Declined):
        await anext(run(relay))
    assert engine._stats["declined"] == 1 and engine._stats["alone"] == 0
    assert settled(engine) and not relay._streams
    await close(relay, engine)


async def test_the_engines_error_arrives_as_itself_after_the_batches_before_it() -> None:
    relay, _, engine, _ = await linked()
    fake = engine._engine
    fake.settings = fake.settings.model_copy(update={"fail_after_tokens": 3})
    got: list[Any] = []
    with pytest.raises(EngineError, match="fake engine failure after 3 tokens"):
        async for batch in run(relay):
            got.append(batch)
    assert sum(c.tokens for batch in got for c in batch) == 3
    await wait_for(lambda: asyncio.sleep(0, settled(engine)))
    assert engine._stats["failed"] == 1
    await close(relay, engine)


async def test_a_reader_that_leaves_stops_the_generation() -> None:
    relay, _, engine, _ = await linked()
    slow_down(engine)
    stream = run(relay)
    assert (await asyncio.wait_for(anext(stream), 10))[0].text
    await stream.aclose()  # the client went away
    await wait_for(lambda: asyncio.sleep(0, engine._stats["cancelled"] == 1))
    await wait_for(lambda: asyncio.sleep(0, settled(engine)))
    await close(relay, engine)


async def test_a_handle_call_waits_for_room_the_link_took_then_is_busy() -> None:
    relay, _, engine, expected = await linked()
    slow_down(engine)
    engine._admitted, engine._queue_wait_s = 1, 0.3
    running = run(relay)
    await asyncio.wait_for(anext(running), 10)
    assert engine._occupied == 1
    # Serve's router counts only the calls it routed: this one reaches the full
    # replica, waits there for room, and is busy (429) once the queue wait is over.
    with pytest.raises(ModelBusy):
        await anext(engine.generate(wire()))
    # A call waiting for room gets it when the running request ends, and a request on
    # the link meanwhile is declined rather than jump ahead of it.
    engine._queue_wait_s = 30
    call = engine.generate(wire())
    waiting = asyncio.ensure_future(anext(call))
    await wait_for(lambda: asyncio.sleep(0, engine._waiting == 1))
    with pytest.raises(Declined):
        await anext(run(relay))
    await running.aclose()
    assert (await asyncio.wait_for(waiting, 10))[0].text == expected.split()[0]
    await call.aclose()
    await wait_for(lambda: asyncio.sleep(0, settled(engine)))
    await close(relay, engine)


async def test_a_stopping_replica_declines_new_runs_and_lets_running_ones_end() -> None:
    relay, _, engine, expected = await linked()
    fake = engine._engine
    fake.settings = fake.settings.model_copy(update={"tokens_per_second": 20})
    running = asyncio.ensure_future(asyncio.wait_for(_all(run(relay)), 10))
    await wait_for(lambda: asyncio.sleep(0, engine._stats["alone"] == 1))
    stopping = asyncio.ensure_future(_stop(engine))
    await wait_for(lambda: asyncio.sleep(0, engine._stopping))
    with pytest.raises(Declined):
        await anext(run(relay))
    assert not stopping.done()  # it waits for the running request
    assert text(await running) == expected  # which ends whole
    await asyncio.wait_for(stopping, 10)
    assert engine._stats["completed"] == 2
    await relay.close()


async def _all(stream: Any) -> list[Any]:
    return [b async for b in stream]


async def _stop(engine: Any) -> None:
    await engine.__del__()


def test_an_engine_error_crosses_the_link_as_its_own_class() -> None:
    from chatfleet.serving.errors import RequestError
    from chatfleet.serving.relay import _rebuilt, error_item

    def crossed(exc: BaseException) -> Any:
        item = json.loads(json.dumps(error_item(exc)))["error"]  # as the frame carries it
        return _rebuilt(item)

    bad = crossed(RequestError("top_k must be positive", param="top_k"))
    assert type(bad) is RequestError and bad.param == "top_k" and bad.status_code == 400
    busy = crossed(ModelBusy("full", retry_after=7))
    assert type(busy) is ModelBusy and busy.retry_after == 7 and busy.status_code == 429
    other = crossed(ValueError("a traceback's text"))
    assert type(other) is EngineError and "traceback" not in other.message
    assert type(_rebuilt(["NoSuchError", "odd"])) is EngineError
