"""The engine side of the token relay (`chatfleet.serving.relay`): one link per relay.

An engine replica keeps one connection to each ingress replica's relay (`Links`);
`relay_batches` sends a request's batches on it and yields, at the end, how many went.
The ingress writes on the link too: requests sent ahead of their handle call
(``["start", stream id, request]``) and their withdrawals (``["drop", stream id]``),
which `Links` hands to its ``on_item``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from chatfleet.serving.protocol import Chunk
from chatfleet.serving.relay import _FAIL, _HEADER, _MAX_FRAME, RelayAddress, encode_batch, frame

logger = logging.getLogger(__name__)

_BACKLOG = 1 << 20  # bytes queued on a link before a stream waits for it to drain
_RETRY_S = (1.0, 30.0)  # an unreachable relay is tried again after 1 s, doubling to 30 s


class LinkLost(ConnectionError):
    """The engine's link to the relay broke (the ingress side hung up or went away)."""


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
        data = frame(self._pending)
        self._pending = []
        try:
            self._writer.write(data)
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


#: What the ingress sent on a link: the link and one item (``["start", ...]``...).
OnItem = Callable[["_Link", list[Any]], None]


class Links:
    """The engine side: one link per relay address, opened on first use.

    With a ``replica`` id, each link says it after the secret, and the ingress may send
    requests ahead on it: each item it sends goes to ``on_item``.
    """

    def __init__(
        self,
        connect_timeout_s: float = 2.0,
        *,
        replica: str = "",
        on_item: OnItem | None = None,
        retry_s: tuple[float, float] = _RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._replica = replica
        self._on_item = on_item
        self._readers: set[asyncio.Task[None]] = set()
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
            reader, writer = await asyncio.wait_for(
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
        hello = address.secret if not self._replica else f"{address.secret} {self._replica}"
        writer.write(hello.encode() + b"\n")
        link = self._links[address] = _Link(writer)
        if self._on_item is not None:
            task = asyncio.create_task(self._read(reader, link, self._on_item))
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)
        return link

    @staticmethod
    async def _read(reader: asyncio.StreamReader, link: _Link, on_item: OnItem) -> None:
        """Hand what the ingress sends on ``link`` to ``on_item``, until it hangs up."""
        try:
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if size > _MAX_FRAME:
                    break
                for item in json.loads(await reader.readexactly(size)):
                    try:
                        on_item(link, item)
                    except Exception:  # one bad item loses itself, not the link
                        logger.exception("token relay: cannot take %.200r", item)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            link.close()

    def close(self) -> None:
        """Hang up every link (the replica is shutting down)."""
        for link in self._links.values():
            link.close()
        self._links.clear()
        for task in self._readers:
            task.cancel()


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
