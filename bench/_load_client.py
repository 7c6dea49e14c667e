"""A lean SSE load client for bench/gateway.py (run as its own process).

Usage: ``python bench/_load_client.py SPEC_JSON``. SPEC keys: ``host``, ``port``,
``path``, ``body`` (JSON object sent as the POST body; ``prompt`` gets a per-request
suffix), ``concurrency``, ``warmup_s``, ``duration_s``, ``read_timeout_s``, ``result_path``,
``ramp_s`` (the workers start evenly spread over it; default 0.1).

Each of ``concurrency`` workers keeps one HTTP/1.1 keep-alive connection (raw
asyncio streams, no HTTP library) and sends requests back to back until the
measurement window closes. Every socket read is timestamped once; the tokens it
carries are the words of the ``text_chunk`` events it completes. So a "chunk"
here is what the client actually sees arrive: several SSE events landing in one
read count as one arrival.

Stdout protocol: a line ``START`` when the window opens, ``END`` when it closes
(the bench samples server CPU time at both), then ``DONE`` once the results are
written as JSON to ``result_path``.
Only tokens that arrive inside the window count; TTFT is kept for requests sent
inside the window; a gap is the time between two token-bearing arrivals of one
stream, kept when the later one is inside the window.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

_TEXT = b"event: text_chunk\ndata: "
_END = b"event: end_stream"
_ERROR = b"event: error"


class Window:
    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.tokens = 0
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.requests_done = 0
        self.requests_sent = 0
        self.errors: list[str] = []
        self.short_replies = 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    return reader, writer


async def _one_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    win: Window,
    read_timeout: float,
    expect_tokens: int,
) -> bool:
    """Send one request and read its SSE stream. Returns whether to keep the connection."""
    now = time.perf_counter
    sent = now()
    in_window = win.start <= sent < win.end
    if in_window:
        win.requests_sent += 1
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
    status = head.split(b" ", 2)[1]
    lower = head.lower()
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {head[:200]!r}")
    chunked = b"transfer-encoding: chunked" in lower
    keep = b"connection: close" not in lower
    raw = bytearray()  # undecoded transfer bytes
    body = bytearray()  # decoded body not yet split into events
    first: float | None = None
    last = 0.0
    tokens_total = 0
    done = False
    eof = False
    while not done:
        data = await asyncio.wait_for(reader.read(1 << 16), read_timeout)
        t = now()
        if not data:
            eof = True
            keep = False
        if chunked:
            raw += data
            pos = 0
            while True:
                nl = raw.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(raw[pos:nl].split(b";", 1)[0], 16)
                if size == 0:
                    if len(raw) >= nl + 4:
                        done = True
                        pos = nl + 4
                    break
                if len(raw) < nl + 2 + size + 2:
                    break
                body += raw[nl + 2 : nl + 2 + size]
                pos = nl + 2 + size + 2
            del raw[:pos]
        else:
            body += data
        tokens = 0
        cut = body.rfind(b"\n\n")
        if cut >= 0:
            for event in bytes(body[:cut]).split(b"\n\n"):
                if event.startswith(_TEXT):
                    text = json.loads(event[len(_TEXT) :])["text"]
                    tokens += len(text.split())
                elif event.startswith(_END):
                    if not chunked:
                        done = True
                elif event.startswith(_ERROR):
                    win.errors.append(event.decode(errors="replace")[:300])
            del body[: cut + 2]
        if tokens:
            tokens_total += tokens
            if win.start <= t < win.end:
                win.tokens += tokens
                if first is None:
                    if in_window:
                        win.ttft.append(t - sent)
                else:
                    win.gaps.append(t - last)
            if first is None:
                first = t
            last = t
        if eof:
            if not done and not chunked:
                done = True
            elif not done:
                raise RuntimeError("connection closed mid-stream")
    if in_window:
        win.requests_done += 1
        if tokens_total != expect_tokens:
            win.short_replies += 1
    return keep


async def _worker(i: int, spec: dict[str, Any], win: Window, stop_at: float) -> None:
    host, port, path = spec["host"], spec["port"], spec["path"]
    timeout = float(spec.get("read_timeout_s", 30.0))
    expect = int(spec.get("expect_tokens", 0))
    base = dict(spec["body"])
    reader = writer = None
    n = 0
    while time.perf_counter() < stop_at:
        if writer is None:
            reader, writer = await _connect(host, port)
        body = dict(base)
        body["prompt"] = f"{base.get('prompt', 'bench')} w{i} r{n}"
        payload = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        n += 1
        try:
            assert reader is not None
            keep = await _one_request(reader, writer, request, win, timeout, expect)
        except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
            win.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            keep = False
            await asyncio.sleep(0.05)
        if not keep:
            writer.close()
            writer = reader = None
    if writer is not None:
        writer.close()


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    loop_start = time.perf_counter()
    warmup = float(spec["warmup_s"])
    duration = float(spec["duration_s"])
    win = Window(loop_start + warmup, loop_start + warmup + duration)
    concurrency = int(spec["concurrency"])
    # Stagger the starts over ramp_s so streams do not all tick in phase.
    ramp = float(spec.get("ramp_s", 0.1))
    tasks = []
    for i in range(concurrency):
        tasks.append(asyncio.create_task(_worker(i, spec, win, win.end)))
        if concurrency > 1:
            await asyncio.sleep(ramp / concurrency)
    await asyncio.sleep(max(0.0, win.start - time.perf_counter()))
    cpu0 = _cpu()
    print("START", flush=True)
    await asyncio.sleep(max(0.0, win.end - time.perf_counter()))
    cpu1 = _cpu()
    print("END", flush=True)
    # In-flight requests finish (bounded by the stream length and read timeouts).
    await asyncio.wait(tasks, timeout=float(spec.get("drain_timeout_s", 60.0)))
    for t in tasks:
        t.cancel()
    return {
        "concurrency": concurrency,
        "window_s": duration,
        "tokens": win.tokens,
        "ttft_s": win.ttft,
        "gaps_s": win.gaps,
        "requests_sent": win.requests_sent,
        "requests_done": win.requests_done,
        "short_replies": win.short_replies,
        "errors": win.errors[:20],
        "error_count": len(win.errors),
        "client_cpu_s": cpu1 - cpu0,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        result = uvloop.run(_run(spec))
    except ImportError:
        result = asyncio.run(_run(spec))
    with open(spec["result_path"], "w") as out:
        json.dump(result, out)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
