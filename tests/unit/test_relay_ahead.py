"""Requests sent ahead on the token relay's link: the engine starts on the copy, and its
handle call joins it; a withdrawn or unclaimed copy stops; a copy after its call, or to
a full replica, is ignored. A real relay and engine replica class on loopback, the fake
engine, no Ray (the router's hook is `send_ahead`, tested at the end)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.fakes.app_server import wait_for

from chatfleet.serving.app._early import EarlyStarts
from chatfleet.serving.app._offers import send_ahead
from chatfleet.serving.config import CoalesceConfig, ModelConfig
from chatfleet.serving.errors import RelayLost
from chatfleet.serving.protocol import (
    Chunk,
    GenerationRequest,
    Message,
    ToolCall,
    WireRequest,
)
from chatfleet.serving.relay import Relay, RelayAddress
from chatfleet.serving.relay_links import Links

REPLICA = "replica-1"


async def engine_replica() -> Any:
    """The engine deployment's class, built as Serve builds it, with a replica id."""
    from chatfleet.serving.app import EngineDeployment

    cls: Any = EngineDeployment.func_or_class  # type: ignore[attr-defined]
    engine = cls.__new__(cls)
    model = ModelConfig(
        name="fake",
        engine="fake",
        fake={"reply_tokens": 12},
    )
    await cls.__init__(engine, model, CoalesceConfig())
    engine._links = Links(replica=REPLICA, on_item=engine._on_link_item)
    return engine


def slow_down(engine: Any) -> None:
    """12 tokens in 2.4 s from now on."""
    fake = engine._engine
    fake.settings = fake.settings.model_copy(update={"tokens_per_second": 5})


async def close(relay: Relay, engine: Any) -> None:
    engine._early.close()
    engine._links.close()
    await relay.close()
    await asyncio.sleep(0.05)  # both ends' readers see the hang-up


def request() -> GenerationRequest:
    return GenerationRequest("fake", [Message("user", "hello")], max_tokens=64)


def wire() -> WireRequest:
    """`request()` as the ingress sends it: on the handle call, and ahead on the link."""
    return WireRequest.of(request())


def test_a_wire_request_decodes_to_the_request_it_was_made_of() -> None:
    call = ToolCall("call-1", "lookup", '{"q": "\\u00e9t\u00e9"}')
    sent = GenerationRequest(
        "fake",
        [
            Message("user", "hello \U0001f600"),
            Message("assistant", "", (call,)),
            Message("tool", "42", (), "call-1"),
        ],
        max_tokens=7,
        stop=["\n\n"],
        sampling={"top_k": 3},
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        response_format={"type": "json_object"},
        logprobs=2,
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        affinity_key="conv-9",
    )
    wire = WireRequest.of(sent)
    # Every field of the request and its messages, as dataclasses.asdict has them.
    assert json.loads(wire.text) == json.loads(json.dumps(dataclasses.asdict(sent)))
    assert wire.affinity_key == "conv-9"  # what the engine's request router reads
    assert wire.decode() == sent  # the same request id too
    assert pickle.loads(pickle.dumps(wire)) == wire


def text(batches: list[list[Chunk]]) -> str:
    return "".join(c.text for batch in batches for c in batch)


async def call_when(
    event: asyncio.Event, engine: Any, address: RelayAddress, key: str
) -> AsyncIterator[Any]:
    """A handle call that reaches the engine only once ``event`` is set (Serve's slow
    gRPC leg)."""
    await event.wait()
    async for message in engine.generate(wire(), address, key):
        yield message


async def linked() -> tuple[Relay, RelayAddress, Any, str]:
    """A relay and an engine replica with a link to it (opened by a first request)."""
    relay = Relay("127.0.0.1")
    address = await relay.start()
    assert address is not None
    engine = await engine_replica()
    key = uuid.uuid4().hex
    call = engine.generate(wire(), address, key)  # as the ingress calls it
    answer = [b async for b in relay.receive(key, call)]
    await wait_for(lambda: asyncio.sleep(0, REPLICA in relay._links))
    return relay, address, engine, text(answer)


async def test_the_engine_starts_on_the_copy_and_the_handle_call_joins_it() -> None:
    relay, address, engine, expected = await linked()
    key, arrived = uuid.uuid4().hex, asyncio.Event()
    stream = relay.receive(key, call_when(arrived, engine, address, key))
    assert relay.offer(REPLICA, key, wire())  # as send_ahead offers it
    first = asyncio.ensure_future(anext(stream))
    # The first batch comes before the handle call reaches the engine.
    assert (await asyncio.wait_for(first, 10))[0].text
    assert engine._stats["early"] == 1 and not arrived.is_set()
    arrived.set()
    rest = [b async for b in stream]
    assert text([await first, *rest]) == expected
    await wait_for(lambda: asyncio.sleep(0, engine._stats["active"] == 0))
    assert engine._stats["completed"] == 2 and engine._stats["relayed"] == 2
    assert relay.stats["offered"] == 1
    await close(relay, engine)


async def test_a_withdrawn_copy_stops_and_its_late_batches_are_ignored() -> None:
    relay, address, engine, _ = await linked()
    slow_down(engine)
    key = uuid.uuid4().hex
    relay.receive(key, call_when(asyncio.Event(), engine, address, key))
    assert relay.offer(REPLICA, key, wire())
    await wait_for(lambda: asyncio.sleep(0, engine._stats["early"] == 1))
    relay.forget(key)  # the client left while Serve routed its call
    await wait_for(lambda: asyncio.sleep(0, engine._stats["cancelled"] == 1))
    assert engine._stats["active"] == 0 and len(engine._early) == 0
    await close(relay, engine)


async def test_an_unclaimed_copy_stops_after_the_claim_window() -> None:
    relay, address, engine, _ = await linked()
    engine._early = EarlyStarts(claim_within_s=0.2)
    slow_down(engine)
    key = uuid.uuid4().hex
    relay.receive(key, call_when(asyncio.Event(), engine, address, key))
    assert relay.offer(REPLICA, key, wire())
    await wait_for(lambda: asyncio.sleep(0, engine._stats["cancelled"] == 1))
    assert engine._stats["early"] == 1 and engine._stats["active"] == 0
    await close(relay, engine)


async def test_a_copy_after_its_handle_call_or_to_a_full_replica_is_ignored() -> None:
    relay, address, engine, expected = await linked()
    key = uuid.uuid4().hex
    call = engine.generate(wire(), address, key)  # as the ingress calls it
    answer = [b async for b in relay.receive(key, call)]
    # The copy comes after the call ran: the engine claimed the id, and ignores it.
    engine._on_link_item(None, ["start", key, {"model": "fake", "messages": []}])
    assert engine._stats["ahead"] == 1 and engine._stats["early"] == 0
    assert text(answer) == expected
    engine._admitted = 0  # full
    other = uuid.uuid4().hex
    relay.receive(other, call_when(asyncio.Event(), engine, address, other))
    assert relay.offer(REPLICA, other, wire())
    await wait_for(lambda: asyncio.sleep(0, engine._stats["ahead"] == 2))
    assert engine._stats["early"] == 0 and len(engine._early) == 0
    await close(relay, engine)


async def test_a_request_moved_to_another_replica_after_its_start_fails_clearly() -> None:
    relay, address, engine, _ = await linked()
    key, arrived = uuid.uuid4().hex, asyncio.Event()
    stream = relay.receive(key, call_when(arrived, engine, address, key))
    assert relay.offer(REPLICA, key, wire())
    await asyncio.wait_for(anext(stream), 10)
    # Serve's call was refused by that replica (full) and goes to another: the answer
    # has started, so the stream fails rather than repeat its start.
    assert not relay.offer("replica-2", key, wire())
    with pytest.raises(RelayLost, match="refused"):
        async for _ in stream:
            pass
    await close(relay, engine)


async def test_a_request_moved_before_its_start_goes_to_the_new_replica_only() -> None:
    relay, address, engine, _ = await linked()
    key = uuid.uuid4().hex
    relay.receive(key, call_when(asyncio.Event(), engine, address, key))
    relay._links["replica-2"] = relay._links[REPLICA]  # a second replica (same socket)
    stream = relay._streams[key]
    stream.offered = "replica-0"  # offered to a replica without a link, then moved
    assert relay.offer("replica-2", key, wire())
    assert stream.refused == {"replica-0"} and stream.offered == "replica-2"
    await close(relay, engine)


def test_send_ahead_offers_only_generate_calls_to_this_processes_relays() -> None:
    address = RelayAddress("127.0.0.1", 1, "s")
    assert not send_ahead([], REPLICA)
    assert not send_ahead(["not a request", address, "k"], REPLICA)
    assert not send_ahead([wire()], REPLICA)  # no relay: the handle alone
    assert not send_ahead([wire(), address, "k"], REPLICA)  # no relay listening there


async def test_send_ahead_from_a_router_on_another_thread_offers_on_the_relays_loop() -> None:
    relay, address, engine, expected = await linked()
    key, arrived = uuid.uuid4().hex, asyncio.Event()
    stream = relay.receive(key, call_when(arrived, engine, address, key))
    # Serve's router on a loop of its own (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1).
    assert await asyncio.to_thread(send_ahead, [wire(), address, key], REPLICA)
    first = await asyncio.wait_for(anext(stream), 10)
    assert engine._stats["early"] == 1
    arrived.set()
    assert text([first, *[b async for b in stream]]) == expected
    await close(relay, engine)


async def test_offers_of_one_event_loop_pass_share_one_write() -> None:
    relay, address, engine, _ = await linked()
    writer = relay._links[REPLICA]
    writes: list[bytes] = []
    write = writer.write
    writer.write = lambda data: (writes.append(data), write(data))[-1]  # type: ignore[method-assign]
    keys = [uuid.uuid4().hex for _ in range(3)]
    for key in keys:
        relay.receive(key, call_when(asyncio.Event(), engine, address, key))
        assert relay.offer(REPLICA, key, wire())
    await wait_for(lambda: asyncio.sleep(0, engine._stats["ahead"] == 3))
    assert len(writes) == 1  # one frame, one system call, for the burst
    for key in keys:
        relay.forget(key)
    await wait_for(lambda: asyncio.sleep(0, engine._stats["active"] == 0))
    assert len(writes) == 2  # the three withdrawals, together too
    await close(relay, engine)
