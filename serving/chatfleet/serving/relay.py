"""The token relay: engine batches to the ingress over one TCP link per replica pair.

A streamed message through a Ray Serve handle costs about 75 µs of CPU in the engine
replica and as much again in the ingress (gRPC's per-message round trips through its
poller thread, Serve's wrappers, serialization). At 256 streams of 60 tokens/s that is
most of two cores. The relay carries the batches instead: the ingress replica listens on
a port of its own (`Relay`), and each engine replica keeps one connection to it
(`Links`), on which the batches of all the streams between the two travel together, as
length-prefixed JSON frames (a frame per event-loop pass, however many streams had a
batch due in it).

The request itself still goes through the Serve handle (routing, max_ongoing_requests,
autoscaling, cancellation and errors stay Serve's), and so does everything when no link
can be made: the engine then yields its batches on the handle as before. With a link, the
handle call yields one message at the end, the number of relay items it sent, so the
ingress knows when it has them all.

A link opens with the relay's secret (passed in each request); frames are plain JSON,
nothing is unpickled from the network. A link lost mid-stream ends its streams with
`RelayLost` (not as a model failure); an unreachable relay is tried again after a
back-off; a reader `MAX_QUEUED` batches behind loses its stream alone; both sides hang
up their links on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from chatfleet.serving.errors import RelayLost
from chatfleet.serving.protocol import Chunk, ToolCallDelta, Usage

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_MAX_FRAME = 64 << 20
_BACKLOG = 1 << 20  # bytes queued on a link before a stream waits for it to drain
_FAIL = "fail"  # the engine failed: its error follows on the handle call
#: How long the ingress waits for relay items in flight once the handle call has ended.
SETTLE_S = 5.0
#: Batches one stream may have waiting for its reader before it is dropped.
MAX_QUEUED = 1024
_RETRY_S = (1.0, 30.0)  # an unreachable relay is tried again after 1 s, doubling to 30 s


class LinkLost(ConnectionError):
    """The engine's link to the relay broke (the ingress side hung up or went away)."""


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """Where an engine sends a request's batches: the ingress replica's relay."""

    host: str
    port: int
    secret: str


def encode_batch(batch: list[Chunk]) -> list[Any]:
    # A tool call's piece is a sixth item, left off the (many) chunks without one.
    return [
        [
            c.kind,
            c.text,
            c.tokens,
            c.finish_reason,
            None if c.usage is None else [c.usage.prompt_tokens, c.usage.completion_tokens],
            *(
                ()
                if c.call is None
                else ([c.call.index, c.call.arguments, c.call.id, c.call.name],)
            ),
        ]
        for c in batch
    ]


def decode_batch(items: list[Any]) -> list[Chunk]:
    return [
        Chunk(
            kind,
            text,
            tokens,
            finish,
            None if usage is None else Usage(*usage),
            ToolCallDelta(*call[0]) if call else None,
        )
        for kind, text, tokens, finish, usage, *call in items
    ]


class _Stream:
    """What the ingress has received for one request, from either path."""

    __slots__ = ("expected", "overflowed", "queue", "received")

    def __init__(self) -> None:
        # Unbounded as a queue, bounded by the link reader (`MAX_QUEUED`), which must
        # never wait on one stream: the link carries every stream of the replica pair.
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.received = 0  # relay items
        self.expected: int | None = None  # relay items the engine says it sent
        self.overflowed = False


class Relay:
    """The ingress side: a listening socket and the streams waiting on it."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._secret = secrets.token_urlsafe(24)
        self._streams: dict[str, _Stream] = {}
        self._server: asyncio.Server | None = None
        self._starting = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._unavailable = False
        self.address: RelayAddress | None = None
        #: Batches received on links, and streams dropped for a reader too far behind.
        self.stats = {"batches": 0, "overflowed": 0}

    async def start(self) -> RelayAddress | None:
        """The relay's address, listening from the first call on; None if it cannot listen
        (then batches go on the handle)."""
        async with self._starting:
            if self.address is None and not self._unavailable:
                try:
                    self._server = await asyncio.start_server(self._serve_link, self._host, 0)
                except OSError as exc:
                    logger.warning("token relay off: cannot listen on %s (%s)", self._host, exc)
                    self._unavailable = True
                    return None
                port = self._server.sockets[0].getsockname()[1]
                self.address = RelayAddress(self._host, port, self._secret)
        return self.address

    async def close(self) -> None:
        """Stop listening and hang up on every link (their engines fall back or fail)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        carried: set[str] = set()  # streams this link delivered to: they end with it
        try:
            hello = await asyncio.wait_for(reader.readline(), 10)
            if not hmac.compare_digest(hello.strip(), self._secret.encode()):
                return
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if size > _MAX_FRAME:
                    return
                for stream_id, item in json.loads(await reader.readexactly(size)):
                    stream = self._streams.get(stream_id)
                    if stream is None or stream.overflowed:
                        continue  # the request is gone (client left), or dropped
                    carried.add(stream_id)
                    stream.received += 1
                    self.stats["batches"] += 1
                    if stream.queue.qsize() >= MAX_QUEUED:
                        stream.overflowed = True
                        self.stats["overflowed"] += 1
                        stream.queue.put_nowait(("overflow", None))
                    else:
                        stream.queue.put_nowait(("relay", item))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            for stream_id in carried:
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.queue.put_nowait(("lost", None))

    def receive(
        self, stream_id: str, handle_stream: AsyncIterator[Any]
    ) -> AsyncGenerator[list[Chunk], None]:
        """The batches of one request: from the relay, or from the handle call itself.

        ``handle_stream`` is the handle call's response; it is read in a task of its own
        (its end, its error, or batches when the engine could not reach the relay). The
        stream is registered now, before any relay item for it can arrive.
        """
        stream = self._streams[stream_id] = _Stream()
        return self._receive(stream_id, stream, handle_stream)

    def forget(self, stream_id: str) -> None:
        """Drop a stream `receive` registered but nobody read (its request was refused)."""
        self._streams.pop(stream_id, None)

    async def _receive(
        self, stream_id: str, stream: _Stream, handle_stream: AsyncIterator[Any]
    ) -> AsyncGenerator[list[Chunk], None]:
        watcher = asyncio.create_task(self._watch(handle_stream, stream))
        error: BaseException | None = None
        failed = False  # the engine said so on the relay: its error comes on the handle
        try:
            while True:
                expected = stream.expected
                if expected is not None and stream.received >= expected and stream.queue.empty():
                    if error is not None:
                        raise error
                    if not failed:
                        return
                try:
                    timeout = SETTLE_S if expected is not None else None
                    source, item = await asyncio.wait_for(stream.queue.get(), timeout)
                except TimeoutError:
                    raise error or RelayLost("batches lost on the token relay") from None
                if source == "lost":
                    if expected is None or stream.received < expected:
                        raise RelayLost("the token relay link from the engine broke")
                    continue  # every item was in before the link closed
                if source == "overflow":
                    raise RelayLost(
                        f"the stream was dropped: its reader fell {MAX_QUEUED} batches behind"
                    )
                if source == "relay":
                    if item == _FAIL:
                        failed = True
                    else:
                        yield decode_batch(item)
                elif source == "batch":
                    yield item
                elif source == "count":
                    stream.expected = item
                elif source == "done":
                    if stream.expected is None:
                        return  # the engine sent everything on the handle
                    if failed:
                        raise RelayLost("the engine failed without an error")
                elif source == "error":
                    if stream.expected is None:
                        raise item  # nothing on the relay to wait for
                    error = item  # raised once the batches before it are in
        finally:
            self._streams.pop(stream_id, None)
            if not watcher.done():
                watcher.cancel()
                with contextlib.suppress(BaseException):
                    await watcher

    @staticmethod
    async def _watch(handle_stream: AsyncIterator[Any], stream: _Stream) -> None:
        put = stream.queue.put_nowait
        try:
            async for message in handle_stream:
                if isinstance(message, int):
                    put(("count", message))
                else:
                    put(("batch", message))
            put(("done", None))
        except Exception as exc:
            put(("error", exc))


class _Link:
    """One engine-to-ingress connection; items sent in one loop pass share a frame."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[list[Any]] = []
        self._scheduled = False
        self.broken = False

    @property
    def backlog(self) -> int:
        """Bytes written but not yet sent (the ingress is behind)."""
        return self._writer.transport.get_write_buffer_size()

    def send(self, stream_id: str, item: Any) -> None:
        if self.broken:
            raise LinkLost("token relay link lost")
        self._pending.append([stream_id, item])
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self.broken:
            return
        payload = json.dumps(self._pending, separators=(",", ":")).encode()
        self._pending = []
        try:
            self._writer.write(_HEADER.pack(len(payload)) + payload)
        except (ConnectionError, RuntimeError):
            self.broken = True

    async def drain(self) -> None:
        self._flush()
        if self.broken or self._writer.is_closing():
            self.broken = True
            raise LinkLost("token relay link lost")
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            self.broken = True
            raise LinkLost(f"token relay link lost: {exc}") from exc

    def close(self) -> None:
        self.broken = True
        self._writer.close()


class Links:
    """The engine side: one link per relay address, opened on first use."""

    def __init__(
        self,
        connect_timeout_s: float = 2.0,
        *,
        retry_s: tuple[float, float] = _RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._links: dict[RelayAddress, _Link] = {}
        # An unreachable relay: when to try again, and the back-off that led there.
        self._retry: dict[RelayAddress, tuple[float, float]] = {}
        self._opening: dict[RelayAddress, asyncio.Future[_Link | None]] = {}
        self._timeout = connect_timeout_s
        self._retry_s = retry_s
        self._clock = clock

    async def get(self, address: RelayAddress) -> _Link | None:
        """The open link to ``address``; None when it cannot be reached now (use the
        handle; it is tried again after a back-off)."""
        link = self._links.get(address)
        if link is not None and not link.broken:
            return link
        retry = self._retry.get(address)
        if retry is not None and self._clock() < retry[0]:
            return None
        opening = self._opening.get(address)
        if opening is None:
            opening = self._opening[address] = asyncio.ensure_future(self._open(address))
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening.pop(address, None)

    async def _open(self, address: RelayAddress) -> _Link | None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), self._timeout
            )
        except (OSError, TimeoutError) as exc:
            previous = self._retry.get(address)
            wait = self._retry_s[0] if previous is None else min(previous[1] * 2, self._retry_s[1])
            self._retry[address] = (self._clock() + wait, wait)
            logger.warning(
                "token relay %s:%s unreachable (%s): batches go on the handle; retry in %.0f s",
                address.host,
                address.port,
                exc,
                wait,
            )
            return None
        self._retry.pop(address, None)
        writer.write(address.secret.encode() + b"\n")
        link = self._links[address] = _Link(writer)
        return link

    def close(self) -> None:
        """Hang up every link (the replica is shutting down)."""
        for link in self._links.values():
            link.close()
        self._links.clear()


async def relay_batches(
    link: _Link, stream_id: str, batches: AsyncGenerator[list[Chunk], None]
) -> AsyncGenerator[int, None]:
    """Send ``batches`` on ``link``; yields once, at the end, how many items went."""
    sent = 0
    try:
        async for batch in batches:
            link.send(stream_id, encode_batch(batch))
            sent += 1
            if link.backlog > _BACKLOG:
                await link.drain()
    except LinkLost:
        raise
    except Exception:
        # The engine failed: the ingress raises its error once the batches before it
        # are in, so the count goes first.
        with contextlib.suppress(LinkLost):
            link.send(stream_id, _FAIL)
            await link.drain()
            yield sent + 1
        raise
    await link.drain()  # on the wire before the count goes on the handle
    yield sent
