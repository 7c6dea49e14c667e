"""The token relay: engine batches to the ingress over one TCP link per replica pair.

A streamed message through a Ray Serve handle costs about 75 µs of CPU in the engine
replica and as much again in the ingress (gRPC's per-message round trips through its
poller thread, Serve's wrappers, serialization). At 256 streams of 60 tokens/s that is
most of two cores. The relay carries the batches instead: the ingress replica listens on
a port of its own (`Relay`), and each engine replica keeps one connection to it
(`relay_links.Links`), on which the batches of all the streams between the two travel together, as
length-prefixed JSON frames (a frame per event-loop pass, however many streams had a
batch due in it).

The request itself goes through the Serve handle (routing, max_ongoing_requests,
autoscaling, cancellation and errors stay Serve's), and so does everything when no link
can be made: the engine then yields its batches on the handle as before. With a link, the
handle call yields one message at the end, the number of relay items it sent, so the
ingress knows when it has them all.

A copy of the request goes ahead on the link (`offer`): once Serve's router has chosen
the engine replica, and when that replica has a link to this relay, the request is
written on the link too, and the engine starts on whichever comes first (Serve's gRPC
call takes 8-33 ms to reach a replica on a busy machine, a line on the link 1-2 ms).
The handle call then joins the generation the link started; a copy whose call never
comes is dropped (`chatfleet.serving.app._early`). A request Serve moves to another
replica (the first refused it: full) is withdrawn from the first, and what that one
sends for it is ignored.

With one engine replica, a model at a fixed replica count, and a link to it, the
request skips Serve's handle call altogether (`run`): it goes on the link only, the
engine starts it there when it has room (else it says it is full, and the ingress makes
the handle call as above, queueing in Serve's router), and the end of the answer, its
count or its error, comes on the link too. Serve's handle call is most of what a
request costs to start in both replicas (its router, the gRPC call, the replica's
request wrapper): bench/request_cpu.py measured 1.2 ms of CPU per request start this
way, against 2.9 ms for bare Ray Serve in the same run. What
the handle call gave is kept: the engine admits up to its ``max_ongoing_requests``, a
client that leaves withdraws the request, the engine's errors arrive as themselves,
and a replica that stops takes no new request and lets the running ones end. A model
that autoscales keeps the handle call for every request (Serve's autoscaler counts the
requests it routes).

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
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from chatfleet.serving import errors
from chatfleet.serving.errors import ChatfleetError, EngineError, RelayLost
from chatfleet.serving.protocol import (
    Chunk,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    WireRequest,
)

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_MAX_FRAME = 64 << 20
_FAIL = "fail"  # the engine failed: its error follows on the handle call (or the link)
# The end of a request run on the link alone (`Relay.run`), after its batches, as one
# JSON object: how many items went ({"end": n}), the engine's error ({"error": [...]}),
# or that the replica is full and did not start it ({"declined": true}).
_END, _ERROR, _DECLINED = "end", "error", "declined"
#: How long the ingress waits for relay items in flight once the handle call has ended.
SETTLE_S = 5.0
#: Batches one stream may have waiting for its reader before it is dropped.
MAX_QUEUED = 1024


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """Where an engine sends a request's batches: the ingress replica's relay."""

    host: str
    port: int
    secret: str


#: Every listening relay of this process by address: where Serve's router (running in
#: the process that calls the handle) finds the relay a request's copy goes through.
_RELAYS: dict[RelayAddress, Relay] = {}


def frame(items: list[Any]) -> bytes:
    """``items`` as one length-prefixed JSON frame (both directions of a link)."""
    payload = json.dumps(items, separators=(",", ":")).encode()
    return _HEADER.pack(len(payload)) + payload


class Declined(Exception):
    """The engine replica did not start a request sent on the link alone (it is full
    or stopping): it has sent nothing for it; make the handle call instead."""


def error_item(exc: BaseException) -> dict[str, Any]:
    """The engine's error as the link carries it: its class name, message, param and
    ``Retry-After``."""
    if isinstance(exc, ChatfleetError):
        return {_ERROR: [type(exc).__name__, exc.message, exc.param, exc.retry_after]}
    return {_ERROR: ["EngineError", "the model failed", None, None]}


def _rebuilt(item: list[Any]) -> ChatfleetError:
    """The error `error_item` encoded, as its own class where chatfleet has it."""
    name, message, param, retry_after = [*item, None, None, None, None][:4]
    cls = getattr(errors, str(name), None)
    error: ChatfleetError = EngineError(str(message))
    if isinstance(cls, type) and issubclass(cls, ChatfleetError):
        for kwargs in ({"param": param}, {}):  # some take no param (e.g. ModelBusy)
            try:
                error = cls(str(message), **kwargs)
                break
            except TypeError:
                continue
    error.param = param
    if isinstance(retry_after, int):
        error.retry_after = retry_after
    return error


def encode_batch(batch: list[Chunk]) -> list[Any]:
    return [_encode_chunk(c) for c in batch]


def _encode_chunk(c: Chunk) -> list[Any]:
    usage = None if c.usage is None else [c.usage.prompt_tokens, c.usage.completion_tokens]
    item = [c.kind, c.text, c.tokens, c.finish_reason, usage]
    # A tool call's piece is a sixth item and logprobs a seventh, left off the (many)
    # chunks without them.
    if c.call is not None or c.logprobs:
        call = c.call
        item.append(None if call is None else [call.index, call.arguments, call.id, call.name])
    if c.logprobs:
        item.append([_encode_logprob(lp) for lp in c.logprobs])
    return item


def decode_batch(items: list[Any]) -> list[Chunk]:
    return [
        Chunk(
            kind,
            text,
            tokens,
            finish,
            None if usage is None else Usage(*usage),
            ToolCallDelta(*rest[0]) if rest and rest[0] else None,
            tuple(_decode_logprob(lp) for lp in rest[1]) if len(rest) > 1 else (),
        )
        for kind, text, tokens, finish, usage, *rest in items
    ]


def _encode_logprob(lp: TokenLogprob) -> list[Any]:
    return [lp.token, lp.logprob, lp.bytes, [_encode_logprob(t) for t in lp.top]]


def _decode_logprob(item: list[Any]) -> TokenLogprob:
    token, logprob, raw, top = item
    return TokenLogprob(
        token,
        logprob,
        None if raw is None else tuple(raw),
        tuple(_decode_logprob(t) for t in top),
    )


class _Stream:
    """What the ingress has received for one request, from either path."""

    __slots__ = ("expected", "offered", "overflowed", "queue", "received", "refused")

    def __init__(self) -> None:
        # Unbounded as a queue, bounded by the link reader (`MAX_QUEUED`), which must
        # never wait on one stream: the link carries every stream of the replica pair.
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.received = 0  # relay items
        self.expected: int | None = None  # relay items the engine says it sent
        self.overflowed = False
        self.offered: str | None = None  # the engine replica a copy went to on its link
        self.refused: set[str] = set()  # replicas it was withdrawn from: ignored


class Relay:
    """The ingress side: a listening socket and the streams waiting on it."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._secret = secrets.token_urlsafe(24)
        self._streams: dict[str, _Stream] = {}
        self._server: asyncio.Server | None = None
        self._starting = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: dict[str, asyncio.StreamWriter] = {}  # by engine replica id
        # Watchers of complete streams reading their handle call's end (held here, as
        # the event loop keeps only weak references to tasks).
        self._finishing: set[asyncio.Task[None]] = set()
        self._unsent: dict[asyncio.StreamWriter, list[str]] = {}  # items by link, `_send`
        self._unavailable = False
        self.address: RelayAddress | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it listens on
        #: Batches received on links, streams dropped for a reader too far behind,
        #: requests sent ahead on a link, and requests sent on a link alone (`run`).
        self.stats = {"batches": 0, "overflowed": 0, "offered": 0, "run": 0}

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
                self.loop = asyncio.get_running_loop()
                _RELAYS[self.address] = self
        return self.address

    @staticmethod
    def at(address: RelayAddress) -> Relay | None:
        """The relay of this process listening at ``address``."""
        return _RELAYS.get(address)

    async def close(self) -> None:
        """Stop listening and hang up on every link (their engines fall back or fail)."""
        if self._server is not None:
            self._server.close()
        if self.address is not None:
            _RELAYS.pop(self.address, None)
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        carried: set[str] = set()  # streams this link delivered to: they end with it
        replica = ""
        try:
            # The secret, then (engines that take requests on the link) their replica id.
            secret, _, named = (await asyncio.wait_for(reader.readline(), 10)).partition(b" ")
            if not hmac.compare_digest(secret.strip(), self._secret.encode()):
                return
            replica = named.strip().decode(errors="replace")
            if replica:
                self._links[replica] = writer
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if size > _MAX_FRAME:
                    return
                for stream_id, item in json.loads(await reader.readexactly(size)):
                    stream = self._streams.get(stream_id)
                    if stream is None or stream.overflowed or replica in stream.refused:
                        continue  # the request is gone (client left), dropped, or moved
                    carried.add(stream_id)
                    if not isinstance(item, dict):  # the end objects are not counted
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
            if self._links.get(replica) is writer:
                del self._links[replica]
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
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._withdraw(stream_id, stream)

    def offer(self, replica: str, stream_id: str, request: WireRequest) -> bool:
        """Send ``request`` ahead to engine ``replica`` on its link, now that Serve's
        router chose it; False when there is no link from it (the handle call alone).

        A stream offered to another replica before (that one refused the handle call)
        is withdrawn from it; if it had already sent some of the answer, the stream
        fails, rather than repeat the answer's start from the new replica.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.offered == replica:
            return stream is not None
        if stream.offered is not None:
            moved_after_start = stream.received > 0
            self._withdraw(stream_id, stream)
            if moved_after_start:
                stream.queue.put_nowait(("moved", None))
                return False
        writer = self._links.get(replica)
        if writer is None or writer.is_closing() or replica in stream.refused:
            return False
        # ["start", stream_id, request_to_json(request)], with the request's JSON as
        # encoded once for both ways it goes.
        self._send(writer, f'["start",{json.dumps(stream_id)},{request.text}]')
        stream.offered = replica
        self.stats["offered"] += 1
        return True

    def run(
        self, replica: str, stream_id: str, request: WireRequest
    ) -> AsyncGenerator[list[Chunk], None] | None:
        """Send ``request`` to engine ``replica`` on its link alone, without a handle
        call: its batches, read as `receive`'s are. The first read raises `Declined`
        when the replica did not start it. None when there is no link from it."""
        writer = self._links.get(replica)
        if writer is None or writer.is_closing():
            return None
        stream = self._streams[stream_id] = _Stream()
        stream.offered = replica
        self._send(writer, f'["run",{json.dumps(stream_id)},{request.text}]')
        self.stats["run"] += 1
        return self._receive(stream_id, stream, None)

    def _withdraw(self, stream_id: str, stream: _Stream) -> None:
        """Tell the replica ``stream`` was offered to that it is not coming (its copy,
        if started, stops), and ignore what it still sends for it."""
        replica, stream.offered = stream.offered, None
        if replica is None:
            return
        stream.refused.add(replica)
        writer = self._links.get(replica)
        if writer is not None:
            self._send(writer, f'["drop",{json.dumps(stream_id)}]')

    def _send(self, writer: asyncio.StreamWriter, item: str) -> None:
        """Send one item (its JSON) on a link at the end of this event-loop pass, in one
        frame with the others due on it: a burst's requests share a write (a system
        call each, else) and a frame's decoding in the engine."""
        unsent = self._unsent.get(writer)
        if unsent is not None:
            unsent.append(item)
            return
        self._unsent[writer] = [item]
        if len(self._unsent) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for writer, items in unsent.items():
            if not writer.is_closing():
                payload = f"[{','.join(items)}]".encode()
                writer.write(_HEADER.pack(len(payload)) + payload)

    async def _receive(
        self, stream_id: str, stream: _Stream, handle_stream: AsyncIterator[Any] | None
    ) -> AsyncGenerator[list[Chunk], None]:
        # No handle call (`run`): the link alone says how the request ends.
        watcher = (
            None
            if handle_stream is None
            else asyncio.create_task(self._watch(handle_stream, stream))
        )
        error: BaseException | None = None
        failed = False  # the engine said so on the relay: its error comes on the handle
        complete = False  # every batch is in: the engine has finished
        ended = False  # the engine said how a request run on the link alone ended
        try:
            while True:
                expected = stream.expected
                if expected is not None and stream.received >= expected and stream.queue.empty():
                    if error is not None:
                        raise error
                    if not failed:
                        complete = True
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
                    elif isinstance(item, dict):  # the end of a request run on the link
                        ended = True
                        if _ERROR in item:
                            raise _rebuilt(item[_ERROR])
                        if item.get(_DECLINED):
                            raise Declined(f"engine replica {stream.offered} is full")
                        stream.expected = int(item[_END])
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
                elif source == "moved":
                    raise RelayLost(
                        "the engine replica that had started the answer refused the request"
                    )
        finally:
            self._streams.pop(stream_id, None)
            if watcher is None:
                if not ended:
                    self._withdraw(stream_id, stream)  # the client left: stop the engine
            elif complete:
                # The engine's call ends right after its count: let the watcher read that
                # end rather than cancel the call (a withdrawal on the link and a gRPC
                # cancellation, work for both replicas, for a generation that is over).
                if not watcher.done():
                    self._finishing.add(watcher)
                    watcher.add_done_callback(self._finishing.discard)
            elif not watcher.done():
                self._withdraw(stream_id, stream)  # the client left: stop its copy too
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
