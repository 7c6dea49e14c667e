"""A streamed request is admitted by its first batch on the token relay, when that comes
in before Serve's word that a replica took the request (gRPC's answer, late under load).

A real `Relay` and real `Links` on loopback; the one stand-in is the handle call, whose
assignment the test holds or settles (Serve's router cannot be held still on purpose).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from ray.serve.exceptions import BackPressureError

from chatfleet.serving.api import Metrics
from chatfleet.serving.app._admission import EngineAdmission, settled
from chatfleet.serving.app._handles import HandleEngineClient
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.errors import ModelBusy
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, Usage
from chatfleet.serving.relay import Relay, RelayAddress
from chatfleet.serving.relay_links import Links, relay_batches

#: A hang guard only: every wait below ends at once when the code works.
GUARD_S = 30.0

ANSWER = [[Chunk("text", "Hello ")], [Chunk("text", "there", 0, "stop", Usage(2, 2))]]


async def batches(sent: list[list[Chunk]]) -> AsyncGenerator[list[Chunk], None]:
    for batch in sent:
        yield batch


class HeldCall:
    """A streaming handle call whose assignment settles when the test says so; the
    engine side (real relay link) runs at once, as the replica would."""

    def __init__(self, links: Links | None, address: RelayAddress, key: str) -> None:
        self.assignment: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cancelled = False
        self._counts: asyncio.Queue[int] = asyncio.Queue()
        self._engine = (
            None if links is None else asyncio.create_task(self._run(links, address, key))
        )

    async def _run(self, links: Links, address: RelayAddress, key: str) -> None:
        link = await links.get(address)
        assert link is not None
        async for count in relay_batches(link, key, batches(ANSWER)):
            await self._counts.put(count)

    async def _fetch_future_result_async(self) -> None:
        await asyncio.shield(self.assignment)

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> HeldCall:
        return self

    async def __anext__(self) -> int:
        await asyncio.shield(self.assignment)
        if self._engine is not None and self._engine.done() and self._counts.empty():
            raise StopAsyncIteration
        return await self._counts.get()


class StandInHandle:
    """What `HandleEngineClient` calls on a DeploymentHandle: options and generate."""

    def __init__(self, engine_runs: bool = True) -> None:
        self.links = Links() if engine_runs else None
        self.calls: list[HeldCall] = []
        self.called = asyncio.Event()
        self.generate = self

    def options(self, **_: Any) -> StandInHandle:
        return self

    def remote(self, request: GenerationRequest, address: RelayAddress, key: str) -> HeldCall:
        call = HeldCall(self.links, address, key)
        self.calls.append(call)
        self.called.set()
        return call


def client(handle: StandInHandle, relay: Relay, **model: Any) -> HandleEngineClient:
    admission = EngineAdmission(ModelConfig(name="m", engine="fake", **model))
    return HandleEngineClient(handle, admission, relay=relay)  # type: ignore[arg-type]


REQUEST = GenerationRequest(model="m", messages=[Message("user", "hi")])


async def test_the_first_relay_batch_comes_out_before_the_assignment_settles() -> None:
    relay = Relay("127.0.0.1")
    handle = StandInHandle()
    stream = client(handle, relay).batches(REQUEST)
    # Serve has not said the replica took the request, yet its first batch is out.
    first = await asyncio.wait_for(anext(stream), GUARD_S)
    assert first == ANSWER[0]
    call = handle.calls[0]
    assert not call.assignment.done()
    call.assignment.set_result(None)  # Serve's answer, late; the count follows it
    rest = [b async for b in stream]
    assert [first, *rest] == ANSWER
    assert not call.cancelled
    await relay.close()


async def test_a_refusal_with_nothing_on_the_relay_is_still_a_429() -> None:
    relay = Relay("127.0.0.1")
    handle = StandInHandle(engine_runs=False)  # no replica took it: nothing is relayed
    stream = client(handle, relay).batches(REQUEST)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(handle.called.wait(), GUARD_S)
    handle.calls[0].assignment.set_exception(
        BackPressureError(num_queued_requests=1, max_queued_requests=1)
    )
    with pytest.raises(ModelBusy):
        await asyncio.wait_for(pending, GUARD_S)
    assert relay._streams == {}  # the stream it registered is gone with it
    await relay.close()


async def test_a_request_nobody_takes_times_out_while_the_relay_is_read() -> None:
    relay = Relay("127.0.0.1")
    handle = StandInHandle(engine_runs=False)
    stream = client(handle, relay, admission={"max_queue_wait_s": 0.05}).batches(REQUEST)
    with pytest.raises(ModelBusy, match="waited"):
        await asyncio.wait_for(anext(stream), GUARD_S)
    assert handle.calls[0].cancelled
    assert relay._streams == {}
    await relay.close()


async def test_a_failed_start_does_not_admit() -> None:
    loop = asyncio.get_running_loop()
    assignment: asyncio.Future[None] = loop.create_future()
    started: asyncio.Future[None] = loop.create_future()
    started.set_exception(ConnectionError("relay link broke"))
    assert not await settled(assignment, started, 0.01)  # the assignment decides
    loop.call_soon(assignment.set_result, None)
    assert await asyncio.wait_for(settled(assignment, started, GUARD_S), GUARD_S)
    good: asyncio.Future[str] = loop.create_future()
    good.set_result("batch")
    assert await settled(loop.create_future(), good, GUARD_S)


@pytest.mark.parametrize("first_batch", ["comes", "fails", "withdrawn"])
async def test_a_request_waiting_in_the_replica_counts_as_queued_until_its_first_batch(
    first_batch: str,
) -> None:
    # A request the replica declined on its link (full by its own count) goes through
    # Serve's router, which takes it at once (it does not count the link's requests),
    # and then waits in the replica: the ingress's gauge holds it until its first batch.
    metrics = Metrics()
    admission = EngineAdmission(ModelConfig(name="m", engine="fake"), metrics)

    def queued() -> float | None:
        return metrics.registry.get_sample_value("chatfleet_queued_requests", {"model": "m"})

    call = HeldCall(None, RelayAddress("127.0.0.1", 1, "s"), "k")
    first: asyncio.Future[list[Chunk]] = asyncio.get_running_loop().create_future()
    call.assignment.set_result(None)  # the router took it at once
    async for _ in admission.admitted(call, started=first, queued_until=first):  # type: ignore[arg-type]
        pass
    assert queued() == 1.0  # admitted by Serve, still waiting in the replica
    if first_batch == "comes":
        first.set_result(ANSWER[0])
    elif first_batch == "fails":
        first.set_exception(ModelBusy("model m is at capacity"))
        first.exception()
    else:
        first.cancel()
    await asyncio.sleep(0)  # done callbacks run on the loop
    assert queued() == 0.0
