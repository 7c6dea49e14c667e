"""The token relay on loopback: a real listening socket, real links, many streams."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from tests.fakes.app_server import wait_for

from chatfleet.serving import relay as relay_module
from chatfleet.serving.errors import EngineError, RelayLost
from chatfleet.serving.protocol import Chunk, TokenLogprob, ToolCallDelta, Usage
from chatfleet.serving.relay import Relay, RelayAddress
from chatfleet.serving.relay_links import LinkLost, Links, relay_batches


def answer(stream: int, n: int) -> list[list[Chunk]]:
    batches = [[Chunk("text", f"s{stream}t{i} "), Chunk("thinking", "hm", 2)] for i in range(n)]
    batches.append([Chunk("text", "", 0, "stop", Usage(3, 3 * n))])
    return batches


async def source(
    batches: list[list[Chunk]], fail_after: int | None = None
) -> AsyncIterator[list[Chunk]]:
    for i, batch in enumerate(batches):
        if i == fail_after:
            raise EngineError("the engine broke")
        await asyncio.sleep(0)
        yield batch


async def engine_call(
    links: Links, address: RelayAddress, key: str, batches: AsyncIterator[list[Chunk]]
) -> AsyncIterator[list[Chunk] | int]:
    """What `EngineDeployment.generate` yields on the handle: batches, or one count."""
    link = await links.get(address)
    if link is None:
        async for batch in batches:
            yield batch
        return
    async for count in relay_batches(link, key, batches):
        yield count


async def test_batches_of_many_streams_share_one_link_and_arrive_in_order() -> None:
    relay = Relay("127.0.0.1")
    address = await relay.start()
    links = Links()
    sent = {i: answer(i, 50) for i in range(20)}

    async def one(i: int) -> list[list[Chunk]]:
        key = uuid.uuid4().hex
        return [
            b async for b in relay.receive(key, engine_call(links, address, key, source(sent[i])))
        ]

    got = await asyncio.gather(*(one(i) for i in range(20)))
    assert got == [sent[i] for i in range(20)]
    assert len(links._links) == 1
    await relay.close()


async def test_a_link_with_the_wrong_secret_delivers_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "SETTLE_S", 0.3)
    relay = Relay("127.0.0.1")
    address = await relay.start()
    forged = RelayAddress(address.host, address.port, "not-the-secret")
    key = uuid.uuid4().hex

    async def handle() -> AsyncIterator[list[Chunk] | int]:
        link = await Links().get(forged)
        assert link is not None
        async for count in relay_batches(link, key, source(answer(0, 3))):
            yield count

    # The relay hangs up: the engine's call fails, or the ingress gives up waiting.
    with pytest.raises(ConnectionError):
        async for _ in relay.receive(key, handle()):
            pytest.fail("a batch came through a link with the wrong secret")
    await relay.close()


async def test_an_unreachable_relay_falls_back_to_the_handle_then_is_tried_again() -> None:
    relay = Relay("127.0.0.1")
    address = await relay.start()
    await relay.close()
    await asyncio.sleep(0.05)
    now = [1000.0]
    links = Links(connect_timeout_s=0.5, retry_s=(1.0, 4.0), clock=lambda: now[0])
    key = uuid.uuid4().hex
    sent = answer(0, 5)
    live = Relay("127.0.0.1")  # receives, but the engine cannot reach `address`
    got = [b async for b in live.receive(key, engine_call(links, address, key, source(sent)))]
    assert got == sent
    assert links._retry[address] == (1001.0, 1.0)
    assert await links.get(address) is None  # within the back-off: no connect attempt
    now[0] += 1.5
    assert await links.get(address) is None  # tried again, still down: the back-off doubles
    assert links._retry[address] == (1003.5, 2.0)
    # The relay is back on the same port (a restarted ingress): the next try links up.
    back = await asyncio.start_server(
        lambda r, w: None, address.host, address.port, reuse_address=True
    )
    now[0] += 2.5
    assert await links.get(address) is not None
    assert address not in links._retry
    links.close()
    back.close()
    await live.close()


async def test_an_engine_failure_arrives_after_the_batches_before_it() -> None:
    relay = Relay("127.0.0.1")
    address = await relay.start()
    key = uuid.uuid4().hex
    sent = answer(0, 10)
    got: list[list[Chunk]] = []
    with pytest.raises(EngineError, match="broke"):
        async for batch in relay.receive(
            key, engine_call(Links(), address, key, source(sent, fail_after=4))
        ):
            got.append(batch)
    assert got == sent[:4]
    await relay.close()


async def test_a_receiver_that_stops_early_leaves_the_link_serving_others() -> None:
    relay = Relay("127.0.0.1")
    address = await relay.start()
    links = Links()
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    stream = relay.receive(first, engine_call(links, address, first, source(answer(0, 100))))
    assert await anext(stream) == answer(0, 100)[0]
    await stream.aclose()  # the client went away
    assert first not in relay._streams
    sent = answer(1, 30)
    got = [
        b async for b in relay.receive(second, engine_call(links, address, second, source(sent)))
    ]
    assert got == sent
    await relay.close()


async def test_a_link_lost_midway_is_reported_not_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "SETTLE_S", 0.3)
    relay = Relay("127.0.0.1")
    address = await relay.start()
    links = Links()
    key = uuid.uuid4().hex

    async def handle() -> AsyncIterator[list[Chunk] | int]:
        link = await links.get(address)
        assert link is not None
        link.send(key, relay_module.encode_batch(answer(0, 1)[0]))
        await link.drain()
        link._writer.close()  # the ingress node went away under the engine
        await asyncio.sleep(0.05)
        async for count in relay_batches(link, key, source(answer(0, 5))):
            yield count

    # Reported as what it is (502 relay_lost), not as a failure of the model: by the
    # ingress, which sees the link close, or by the engine's next send on it.
    with pytest.raises((RelayLost, LinkLost)):
        async for _ in relay.receive(key, handle()):
            pass
    assert await links.get(address) is not None  # a broken link is replaced
    await relay.close()


async def test_an_ingress_that_hangs_up_ends_its_streams_with_relay_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "SETTLE_S", 0.3)
    relay = Relay("127.0.0.1")
    address = await relay.start()
    links = Links()
    key = uuid.uuid4().hex
    stalled = asyncio.Event()

    async def batches() -> AsyncIterator[list[Chunk]]:
        yield answer(0, 1)[0]
        stalled.set()
        await asyncio.sleep(30)  # the engine is still generating when the link goes
        yield answer(0, 1)[1]

    async def handle() -> AsyncIterator[list[Chunk] | int]:
        async for message in engine_call(links, address, key, batches()):
            yield message

    async def consume() -> list[list[Chunk]]:
        return [b async for b in relay.receive(key, handle())]

    task = asyncio.create_task(consume())
    await stalled.wait()
    links.close()  # the engine replica shuts down: its links are hung up
    with pytest.raises(RelayLost, match="broke"):  # at once, not when the engine next sends
        await asyncio.wait_for(task, 10)
    await relay.close()


async def test_a_reader_too_far_behind_loses_its_stream_not_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "MAX_QUEUED", 5)
    relay = Relay("127.0.0.1")
    address = await relay.start()
    links = Links()
    slow, fast = uuid.uuid4().hex, uuid.uuid4().hex
    slow_stream = relay.receive(slow, engine_call(links, address, slow, source(answer(0, 40))))
    assert await anext(slow_stream) == answer(0, 40)[0]  # then it stops reading
    sent = answer(1, 40)
    got = [b async for b in relay.receive(fast, engine_call(links, address, fast, source(sent)))]
    assert got == sent  # the shared link kept serving the other stream

    async def overflowed() -> int:
        return relay.stats["overflowed"]

    await wait_for(overflowed)
    with pytest.raises(RelayLost, match="behind"):
        async for _ in slow_stream:
            pass
    assert relay._streams == {}
    await relay.close()


def test_frames_are_json_not_pickles() -> None:
    batch = answer(7, 2)[-1] + answer(7, 2)[0]
    # Tool calls' pieces cross too: the first names its call, the next ones add arguments.
    batch += [
        Chunk("tool_call", "", 1, call=ToolCallDelta(0, '{"a"', "call_1", "f")),
        Chunk("tool_call", "", 1, call=ToolCallDelta(0, ": 1}")),
    ]
    # And logprobs, with their alternatives and the bytes of a token cut inside a character.
    top = (TokenLogprob(" a", -0.5), TokenLogprob("\ufffd", -1.5, bytes=(0xE2, 0x80)))
    batch.append(Chunk("text", " a", 1, logprobs=(TokenLogprob(" a", -0.5, top=top),)))
    batch.append(Chunk("text", "\u2026", 2, logprobs=(top[1], TokenLogprob("\ufffd", -0.1))))
    encoded = relay_module.encode_batch(batch)
    assert relay_module.decode_batch(json.loads(json.dumps(encoded))) == batch


async def test_a_failure_is_raised_even_when_its_error_lags_the_relay() -> None:
    # The relay may deliver every item, the failure marker included, before the
    # handle call's error arrives: the stream must wait for it, not end cleanly.
    relay = Relay("127.0.0.1")
    address = await relay.start()
    key = uuid.uuid4().hex

    async def slow_error() -> AsyncIterator[list[Chunk] | int]:
        try:
            async for message in engine_call(
                Links(), address, key, source(answer(0, 5), fail_after=2)
            ):
                yield message
        except EngineError:
            await asyncio.sleep(0.2)
            raise

    got: list[list[Chunk]] = []
    with pytest.raises(EngineError, match="broke"):
        async for batch in relay.receive(key, slow_error()):
            got.append(batch)
    assert got == answer(0, 5)[:2]
    await relay.close()


async def test_a_relay_that_cannot_listen_is_off_not_an_error() -> None:
    relay = Relay("203.0.113.7")  # TEST-NET-3: no interface here has this address
    assert await relay.start() is None
    assert await relay.start() is None  # tried once
    await relay.close()


class EndingCall:
    """A relay, an engine's handle call of ``n`` batches on it, and how that call
    ended ("ended" or "cancelled"); the relay's withdrawals are recorded, not sent."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.relay = Relay("127.0.0.1")
        self.key = uuid.uuid4().hex
        self.ended: list[str] = []
        self.withdrawn: list[str] = []
        self.relay._withdraw = lambda stream_id, _: self.withdrawn.append(stream_id)  # type: ignore[method-assign]

    async def stream(self) -> AsyncGenerator[list[Chunk], None]:
        address = await self.relay.start()
        assert address is not None
        return self.relay.receive(self.key, self._call(Links(), address))

    async def _call(self, links: Links, address: RelayAddress) -> AsyncIterator[list[Chunk] | int]:
        try:
            async for message in engine_call(links, address, self.key, source(answer(0, self.n))):
                yield message
            await asyncio.sleep(0.05)  # the call's end comes a little after the count
            self.ended.append("ended")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise


async def test_a_complete_stream_lets_its_call_end_rather_than_cancel_it() -> None:
    # Cancelling the handle call of a finished generation (and withdrawing it on the
    # link) would be work for both replicas for nothing: its end is read instead.
    call = EndingCall(3)
    assert [b async for b in await call.stream()] == answer(0, 3)
    await wait_for(lambda: asyncio.sleep(0, bool(call.ended)))
    assert call.ended == ["ended"] and not call.withdrawn
    assert not call.relay._finishing and not call.relay._streams
    await call.relay.close()


async def test_a_reader_that_leaves_early_withdraws_and_cancels_the_call() -> None:
    call = EndingCall(50)
    stream = await call.stream()
    assert await anext(stream) == answer(0, 50)[0]
    await stream.aclose()
    assert call.withdrawn == [call.key] and call.ended == ["cancelled"]
    await call.relay.close()
