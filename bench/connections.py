"""Connections benchmark: do idle WebSockets starve HTTP, and what do they cost?

Run from the repository root::

    .venv/bin/python bench/connections.py                      # Ray Serve, 0/1,000/5,000 sockets
    .venv/bin/python bench/connections.py --levels 0,1000,9000
    .venv/bin/python bench/connections.py --levels 0,10000 --sockets-via replica --probes 1000
    .venv/bin/python bench/connections.py --path uvicorn       # the app alone, 5,000 sockets
    .venv/bin/python bench/connections.py --path uvicorn --quick

Path "ray" (the default, the headline): chatfleet as ``chatfleet serve`` runs it
(bench/_chatfleet_server.py: Ray Serve in throughput mode, HAProxy in front of the
ingress replica, the fake engine in its own replica, default settings, auth off).
Scenario "probe", at each level N of ``--levels``: N clients open ``/ws/chat``
sockets and then only answer the server's heartbeat pings; with them held, this
process measures ``GET /healthz`` latency (sequential requests) and a streamed
``/v1/chat/completions``'s time to first token (sequential, fake engine paced at
``--tokens-per-second``), and reads the RSS of the ingress replica and of HAProxy.
Requests that time out (20 s) are counted, not waited on again. Each row ends with the
machine's 1-minute load average when its probes started (the box is shared). HAProxy
holds as many connections as its open-files limit allows (2.5 files each): where the
hard limit cannot be raised (20,000 on the shared CI box: ~7,900 connections),
``--sockets-via replica`` opens the idle sockets straight to the ingress replica's own
port (read from HAProxy's config) while the probes still go through HAProxy, which
measures what the sockets cost the ingress past HAProxy's cap.

Path "uvicorn": the server is one uvicorn process (a subprocess of this script) serving
``create_app`` over the fake engine with auth on, as the ingress replica does;
under Ray Serve the same app runs inside the ingress replica (Serve's proxy in
front of it is a separate process, not measured on this path). Clients run in their own
processes, so the server's CPU and memory are its own; both sides raise their
open-files limit with ``resource.setrlimit``.

Scenario "idle": N clients open ``WS /ws/chat?token=...`` (offering
permessage-deflate, as browsers do), read ``connection_ack`` and then only answer
the server's heartbeat ``ping`` with ``pong`` (``websocket.ping_interval_s`` is
short, 5 s by default, so several heartbeat rounds pass during the hold).
Reported: connections opened, still alive after the hold (a peer that misses
``pong_timeout_s`` is dropped by the server), pings received, the server's RSS
before and with them (and per connection), and the server's CPU during the hold
(what heartbeats cost). Target: >= 5,000 connections in <= 1 GiB.

Scenario "chat": 100 connections each send ``chat`` frames back to back for the
window; a reply is ``token`` frames then ``complete`` {total_tokens}. Reported:
tokens/s over the window (tokens of replies completed in it), time to first
token (``chat`` sent -> first ``token`` frame) p50/p99/max, and both processes'
CPU. The fake engine is unpaced by default (``--tokens-per-second 0``): the
figure is what the ingress itself can push.

It prints figures only; it asserts nothing about timings.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (bench/operator.py): keep it off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import contextlib
import json
import resource
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# ---------------------------------------------------------------------------
# server process: create_app over the fake engine under uvicorn


def run_server(spec: dict[str, Any]) -> int:
    import uvicorn

    from chatfleet.serving.api import LocalEngineClient, create_app
    from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
    from chatfleet.serving.config import AppConfig, ModelConfig
    from chatfleet.serving.engines.fake import FakeEngine

    fd_limit = raise_fd_limit()
    model = ModelConfig(
        name="fake",
        engine="fake",
        fake={"reply_tokens": spec["reply_tokens"], "tokens_per_second": spec["tps"]},
    )
    config = AppConfig(
        models=[model],
        # Every bench client shares one client id: no per-client rate limit here.
        auth={"clients": [], "rate_limit": {"enabled": False}, "access_token_ttl_s": 3600},
        websocket={
            "ping_interval_s": spec["ping_interval_s"],
            "pong_timeout_s": spec["pong_timeout_s"],
            "max_connections": spec["max_connections"],
        },
    )
    auth = Authenticator(config.auth, secrets.token_urlsafe(48), MemoryRevocationStore())
    engines = {model.name: LocalEngineClient(FakeEngine(model), config.coalesce)}

    async def start_engines() -> None:
        for engine in engines.values():
            await engine.start()

    app = create_app(config, engines, auth=auth, on_startup=start_engines)
    token = auth.mint("bench", ["chat"]).access_token
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=spec["port"],
            log_level="warning",
            ws=spec["ws"],
            # The app's own heartbeat (ping/pong frames) is what is measured.
            ws_ping_interval=None,
            backlog=4096,
        )
    )

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                return
            await asyncio.sleep(0.05)
        protocol = server.config.ws_protocol_class
        ws_impl = f"{protocol.__module__}.{protocol.__qualname__}" if protocol else "none"
        emit(event="ready", token=token, fd_limit=fd_limit, ws_impl=ws_impl)
        await task

    asyncio.run(serve())
    return 0


# ---------------------------------------------------------------------------
# idle clients: open N connections, answer pings, report


async def run_idle_clients(spec: dict[str, Any]) -> None:
    from websockets.asyncio.client import connect

    fd_limit = raise_fd_limit()
    url = f"ws://127.0.0.1:{spec['port']}/ws/chat?token={spec['token']}"
    compression = "deflate" if spec["compression"] == "deflate" else None
    gate = asyncio.Semaphore(spec["open_concurrency"])
    opened: list[Any] = []
    errors: list[str] = []
    pings = 0
    closed_by_server = 0

    async def hold(ws: Any) -> None:
        nonlocal pings, closed_by_server
        try:
            async for raw in ws:
                if json.loads(raw).get("type") == "ping":
                    pings += 1
                    await ws.send('{"type":"pong"}')
        except Exception:
            pass
        closed_by_server += 1

    async def open_one() -> None:
        async with gate:
            try:
                ws = await connect(
                    url, ping_interval=None, compression=compression, open_timeout=60
                )
                ack = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if ack.get("type") != "connection_ack":
                    raise RuntimeError(f"expected connection_ack, got {ack}")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
        opened.append(ws)
        # Answer heartbeats at once: opening all of them takes a while.
        holders.append(asyncio.create_task(hold(ws)))

    holders: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(spec["connections"])))
    emit(
        event="opened",
        ok=len(opened),
        failed=len(errors),
        seconds=time.perf_counter() - started,
        errors=sorted(set(errors))[:3],
        fd_limit=fd_limit,
        cpu=self_cpu(),
    )
    # Hold until the orchestrator says so (a line on stdin).
    pings_before = pings
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    alive = sum(1 for ws in opened if ws.state.name == "OPEN")
    emit(
        event="held",
        alive=alive,
        pings=pings - pings_before,
        closed_by_server=closed_by_server,
        cpu=self_cpu(),
    )
    for task in holders:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)


# ---------------------------------------------------------------------------
# chat clients: M connections sending chats back to back


@dataclass
class Reply:
    sent: float
    first: float | None
    done: float
    tokens: int


async def run_chat_clients(spec: dict[str, Any]) -> None:
    from websockets.asyncio.client import connect

    raise_fd_limit()
    url = f"ws://127.0.0.1:{spec['port']}/ws/chat?token={spec['token']}"
    replies: list[Reply] = []
    errors: list[str] = []
    arrived = [0]  # tokens that arrived inside the window
    begin = time.perf_counter() + 1.0  # every connection is open by then (100 of them)
    window_start = begin + spec["warmup_s"]
    window_end = window_start + spec["duration_s"]

    async def stream(index: int) -> None:
        async with connect(url, ping_interval=None, open_timeout=60, max_size=None) as ws:
            await ws.recv()  # connection_ack
            await asyncio.sleep(max(0.0, begin - time.perf_counter()))
            n = 0
            while time.perf_counter() < window_end:
                n += 1
                sent = time.perf_counter()
                await ws.send(json.dumps({"type": "chat", "content": f"bench {index} {n}"}))
                first: float | None = None
                while True:
                    frame = json.loads(await ws.recv())
                    kind = frame.get("type")
                    if kind == "token":
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        if window_start <= now <= window_end:
                            # The fake engine's tokens are words.
                            arrived[0] += len(frame["content"].split())
                    elif kind == "complete":
                        replies.append(
                            Reply(sent, first, time.perf_counter(), int(frame["total_tokens"]))
                        )
                        break
                    elif kind == "ping":
                        await ws.send('{"type":"pong"}')
                    elif kind == "error":
                        errors.append(str(frame.get("code")))
                        break

    cpu0 = self_cpu()
    emit(event="start", at=time.time() + (window_start - time.perf_counter()))
    results = await asyncio.gather(
        *(stream(i) for i in range(spec["streams"])), return_exceptions=True
    )
    errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    in_window = [r for r in replies if window_start <= r.done <= window_end]
    started_in_window = [r for r in replies if window_start <= r.sent <= window_end and r.first]
    ttft = sorted((r.first or r.done) - r.sent for r in started_in_window)
    emit(
        event="done",
        replies=len(in_window),
        tokens=arrived[0],
        window_s=spec["duration_s"],
        ttft=ttft,
        errors=sorted(set(errors))[:5],
        error_count=len(errors),
        cpu=self_cpu() - cpu0,
    )


# ---------------------------------------------------------------------------
# orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(mode: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-P", os.path.abspath(__file__), mode, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_event(proc: subprocess.Popen[str], timeout_s: float = 600) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process {proc.args!r} exited ({proc.wait()})")
        with contextlib.suppress(ValueError):
            event: dict[str, Any] = json.loads(line)
            return event
    raise TimeoutError("no event from the child process")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def server_process(
    args: argparse.Namespace,
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    spec = {
        "port": free_port(),
        "reply_tokens": args.reply_tokens,
        "tps": args.tokens_per_second,
        "ping_interval_s": args.ping_interval,
        "pong_timeout_s": args.pong_timeout,
        "max_connections": max(10_000, args.connections + 100),
        "ws": args.ws,
    }
    proc = spawn("_server", spec)
    try:
        ready = read_event(proc, 120)
        yield proc, {**spec, **ready}
    finally:
        stop(proc)


@contextlib.contextmanager
def ray_server_process(
    args: argparse.Namespace,
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """chatfleet on Ray Serve, as ``chatfleet serve`` runs it (bench/_chatfleet_server.py)."""
    port = free_port()
    config = {
        "auth": {"enabled": False},
        "models": [
            {
                "name": "fake",
                "engine": "fake",
                "fake": {
                    "reply_tokens": args.reply_tokens,
                    "tokens_per_second": args.tokens_per_second,
                },
            }
        ],
        "websocket": {"ping_interval_s": args.ping_interval, "pong_timeout_s": args.pong_timeout},
        # The figures are one replica's (sockets, RSS, its own port for --sockets-via
        # replica): one ingress replica holds them all, where the default two would share.
        "ingress": {"num_replicas": 1},
    }
    helper = os.path.join(_HERE, "_chatfleet_server.py")
    proc = subprocess.Popen(
        [sys.executable, "-P", helper, json.dumps(config), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"the Ray server did not start ({proc.wait()})")
        yield proc, {"port": port, "pid": proc.pid, "start_s": float(line.split()[1])}
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pids_named(fragment: str, root: int) -> list[int]:
    """Descendants of ``root`` whose command line contains ``fragment`` (Ray names
    replicas in it); other people's processes on a shared box are not counted."""
    parents: dict[int, int] = {}
    commands: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commands[int(entry)] = f.read()
        except OSError:
            continue

    def under_root(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return [p for p, c in commands.items() if fragment.encode() in c and under_root(p)]


def rss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_bytes(pid)
    return total


def ingress_replica_port(root: int) -> int:
    """The ingress replica's own HTTP port, read from the config of HAProxy in front of it."""
    for pid in pids_named("haproxy", root):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        if "-f" not in argv:
            continue
        with open(argv[argv.index("-f") + 1]) as f:
            for line in f:
                words = line.split()
                if words[:1] == ["server"] and "-ingress-" in words[1]:
                    return int(words[2].rsplit(":", 1)[1])
    raise RuntimeError("no HAProxy backend server for the ingress replica")


async def probe_http(port: int, healthz: int, chats: int) -> dict[str, Any]:
    """Sequential /healthz latencies and streamed-chat TTFTs, with timeouts counted."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    health: list[float] = []
    ttft: list[float] = []
    timeouts = 0
    chat = {
        "model": "fake",
        "stream": True,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hello there"}],
    }
    async with httpx.AsyncClient(timeout=20) as http:
        with contextlib.suppress(httpx.HTTPError):
            await http.get(f"{base}/healthz")  # a warm connection pool, not measured
        for _ in range(healthz):
            started = time.perf_counter()
            try:
                response = await http.get(f"{base}/healthz")
                if response.status_code == 200:
                    health.append(time.perf_counter() - started)
            except httpx.TimeoutException:
                timeouts += 1
        for _ in range(chats):
            started = time.perf_counter()
            try:
                async with http.stream("POST", f"{base}/v1/chat/completions", json=chat) as r:
                    async for line in r.aiter_lines():
                        if '"content"' in line:
                            ttft.append(time.perf_counter() - started)
                            break
            except httpx.TimeoutException:
                timeouts += 1
    return {"healthz": sorted(health), "ttft": sorted(ttft), "timeouts": timeouts}


def probe_scenario(args: argparse.Namespace, info: dict[str, Any]) -> None:
    print(
        f"\nIdle sockets vs HTTP, through Ray Serve (HAProxy -> ingress replica -> engine"
        f" replica; default settings: ingress HTTP budget 1000, websocket.max_connections"
        f" 10000; server ping every {args.ping_interval:g} s; hold {args.hold:g} s per level)"
    )
    print(
        f"  {'sockets':>7} {'opened':>7} {'failed':>7} {'alive':>7} {'healthz p50':>12}"
        f" {'p99':>8} {'TTFT p50':>9} {'p99':>8} {'timeouts':>9} {'ingress RSS':>12}"
        f" {'HAProxy RSS':>12} {'load':>5}"
    )
    baseline_p99: float | None = None
    sockets_port = info["port"]
    if args.sockets_via == "replica":
        sockets_port = ingress_replica_port(info["pid"])
        print(
            f"  (idle sockets straight to the ingress replica's port {sockets_port}, past"
            " HAProxy; the probes through HAProxy)"
        )
    for level in args.levels:
        ingress = pids_named("ServeReplica:chatfleet:ingress", info["pid"])
        haproxy = pids_named("haproxy", info["pid"])
        client = None
        opened = {"ok": 0, "failed": 0, "errors": []}
        if level:
            client = spawn(
                "_idle",
                {
                    "port": sockets_port,
                    "token": "",
                    "connections": level,
                    "open_concurrency": 100,
                    "compression": args.compression,
                },
            )
        try:
            if client is not None:
                opened = read_event(client)
            time.sleep(args.hold)  # heartbeats go round while they are held
            load = os.getloadavg()[0]
            probe = asyncio.run(probe_http(info["port"], args.probes, args.probes))
            rss_ingress, rss_haproxy = rss_of(ingress), rss_of(haproxy)
            held = {"alive": 0}
            if client is not None:
                assert client.stdin is not None
                client.stdin.write("stop\n")
                client.stdin.flush()
                held = read_event(client)
        finally:
            if client is not None:
                stop(client)
        health, ttft = probe["healthz"], probe["ttft"]
        p99 = percentile(ttft, 0.99)
        if baseline_p99 is None:
            baseline_p99 = p99
        print(
            f"  {level:>7} {opened['ok']:>7} {opened['failed']:>7} {held['alive']:>7}"
            f" {1000 * percentile(health, 0.5):>9.1f} ms {1000 * percentile(health, 0.99):>5.1f} ms"
            f" {1000 * percentile(ttft, 0.5):>6.1f} ms {1000 * p99:>5.1f} ms"
            f" {probe['timeouts']:>9} {rss_ingress / MiB:>8.0f} MiB {rss_haproxy / MiB:>8.0f} MiB"
            f" {load:>5.1f}"
        )
        if opened["errors"]:
            print(f"    open errors: {opened['errors']}")
        time.sleep(2)  # let the server see the sockets close before the next level
    print(
        "  (TTFT is of the fake engine, which adds nothing: it is the path's own latency;"
        " the target is chat p99 TTFT within 10 ms of the no-socket figure.)"
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def idle_scenario(
    args: argparse.Namespace, server: subprocess.Popen[str], info: dict[str, Any]
) -> None:
    pid = server.pid
    time.sleep(1.0)
    rss0 = rss_bytes(pid)
    client = spawn(
        "_idle",
        {
            "port": info["port"],
            "token": info["token"],
            "connections": args.connections,
            "open_concurrency": 200,
            "compression": args.compression,
        },
    )
    try:
        opened = read_event(client)
        rss_open = rss_bytes(pid)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        peak = rss_open
        deadline = t0 + args.hold
        while time.perf_counter() < deadline:
            time.sleep(0.5)
            peak = max(peak, rss_bytes(pid))
        server_cpu = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
        rss_held = rss_bytes(pid)
        assert client.stdin is not None
        client.stdin.write("stop\n")
        client.stdin.flush()
        held = read_event(client)
    finally:
        stop(client)
    n = max(1, held["alive"])
    print(
        f"\nIdle WebSocket connections (WS /ws/chat with a token; server ping every"
        f" {args.ping_interval:g} s, pong timeout {args.pong_timeout:g} s; client"
        f" compression: {args.compression}; hold {args.hold:g} s)"
    )
    print(
        f"  {'target':>7} {'opened':>7} {'failed':>7} {'open s':>7} {'alive':>7}"
        f" {'pings':>7} {'RSS before':>11} {'RSS held':>9} {'RSS peak':>9}"
        f" {'per conn':>9} {'srv CPU':>8}"
    )
    print(
        f"  {args.connections:>7} {opened['ok']:>7} {opened['failed']:>7}"
        f" {opened['seconds']:>7.1f} {held['alive']:>7} {held['pings']:>7}"
        f" {rss0 / MiB:>7.0f} MiB {rss_held / MiB:>5.0f} MiB {peak / MiB:>5.0f} MiB"
        f" {(rss_held - rss0) / n / 1024:>5.1f} KiB {100 * server_cpu:>7.1f}%"
    )
    expected_pings = held["alive"] * args.hold / args.ping_interval
    print(
        f"  heartbeats during the hold: {held['pings']} pings answered"
        f" (at most {expected_pings:.0f}: one per connection per period); server dropped:"
        f" {held['closed_by_server']}"
    )
    if args.connections >= 5000:
        verdict = "met" if held["alive"] >= 5000 and peak <= 1024 * MiB else "NOT met"
        print(
            f"  target >= 5,000 connections in <= 1 GiB: {verdict}"
            f" ({held['alive']} alive after the hold, peak RSS {peak / MiB:.0f} MiB)"
        )
    else:
        projected = rss0 + 5000 * (rss_held - rss0) / n
        print(
            f"  target >= 5,000 connections in <= 1 GiB: not measured ({args.connections}"
            f" opened); at this cost per connection 5,000 would take {projected / MiB:.0f} MiB"
        )
    if opened["errors"]:
        print(f"  open errors: {opened['errors']}")
    print(f"  fd limit: server {info['fd_limit']}, client {opened['fd_limit']}")


def chat_scenario(
    args: argparse.Namespace, server: subprocess.Popen[str], info: dict[str, Any]
) -> None:
    pid = server.pid
    client = spawn(
        "_chat",
        {
            "port": info["port"],
            "token": info["token"],
            "streams": args.chats,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
        },
    )
    try:
        start = read_event(client)
        time.sleep(max(0.0, start["at"] - time.time()))
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        time.sleep(args.duration)
        server_cpu = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
        done = read_event(client)
    finally:
        stop(client)
    ttft: list[float] = done["ttft"]
    pace = f"{args.tokens_per_second:g} tokens/s" if args.tokens_per_second else "unpaced"
    print(
        f"\nConcurrent chats (WS /ws/chat; {args.chats} connections sending back to back;"
        f" fake engine {args.reply_tokens} tokens a reply, {pace}; window {args.duration:g} s"
        f" after {args.warmup:g} s warm-up)"
    )
    print(
        f"  {'streams':>7} {'replies':>8} {'tokens/s':>9} {'TTFT p50':>9} {'p99':>8}"
        f" {'max':>8} {'errors':>7} {'srv CPU':>8} {'tok/srv CPU-s':>14} {'client CPU':>11}"
    )
    print(
        f"  {args.chats:>7} {done['replies']:>8} {done['tokens'] / done['window_s']:>9.0f}"
        f" {1000 * statistics.median(ttft) if ttft else float('nan'):>6.1f} ms"
        f" {1000 * percentile(ttft, 0.99):>5.1f} ms"
        f" {1000 * max(ttft, default=float('nan')):>5.1f} ms"
        f" {done['error_count']:>7} {100 * server_cpu:>7.1f}%"
        f" {done['tokens'] / max(1e-9, server_cpu * args.duration):>14.0f}"
        f" {100 * done['cpu'] / (args.duration + args.warmup + 1):>10.1f}%"
    )
    if done["errors"]:
        print(f"  errors: {done['errors']}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("_server", "_idle", "_chat"):
        spec = json.loads(sys.argv[2])
        if sys.argv[1] == "_server":
            return run_server(spec)
        runner = run_idle_clients if sys.argv[1] == "_idle" else run_chat_clients
        asyncio.run(runner(spec))
        return 0

    parser = argparse.ArgumentParser(
        description="Idle WebSocket connections one ingress process holds (and its RSS);"
        " 100 concurrent chats' tokens/s and time to first token. Prints figures only."
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,000 idle connections, short windows."
    )
    parser.add_argument(
        "--connections", type=int, help="Idle connections (default 5000; quick 1000)."
    )
    parser.add_argument("--hold", type=float, help="Seconds to hold them (default 20; quick 11).")
    parser.add_argument("--ping-interval", type=float, default=5.0, help="Server ping period, s.")
    parser.add_argument("--pong-timeout", type=float, default=10.0, help="Server pong timeout, s.")
    parser.add_argument(
        "--compression",
        choices=["deflate", "none"],
        default="deflate",
        help="Idle clients offer permessage-deflate (browsers do) or not.",
    )
    parser.add_argument("--ws", default="auto", help="uvicorn's WebSocket implementation.")
    parser.add_argument("--chats", type=int, default=100, help="Concurrent chat connections.")
    parser.add_argument("--duration", type=float, help="Chat window, s (default 20; quick 8).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Chat warm-up, s.")
    parser.add_argument("--reply-tokens", type=int, default=256, help="Tokens a reply.")
    parser.add_argument(
        "--tokens-per-second", type=float, default=0.0, help="Fake engine pace (0: unpaced)."
    )
    parser.add_argument(
        "--scenarios",
        help="Comma-separated: idle, chat (path uvicorn; default both), probe (path ray).",
    )
    parser.add_argument(
        "--path",
        choices=["ray", "uvicorn"],
        default="ray",
        help="ray: through Ray Serve as chatfleet serve runs it (the headline);"
        " uvicorn: the app alone in one process.",
    )
    parser.add_argument(
        "--levels", default="0,1000,5000", help="Idle sockets at each probe level (path ray)."
    )
    parser.add_argument("--probes", type=int, default=30, help="Requests of each kind a level.")
    parser.add_argument(
        "--sockets-via",
        choices=["haproxy", "replica"],
        default="haproxy",
        help="Path ray: idle sockets through HAProxy (as users connect) or straight to the"
        " ingress replica's port (past HAProxy's maxconn, which the file limit caps).",
    )
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.path == "ray":
        args.hold = args.hold or 10.0
        args.tokens_per_second = args.tokens_per_second or 50.0
        print(
            "bench/connections.py --path ray: chatfleet on Ray Serve (HAProxy in front of the"
            " ingress replica, as chatfleet serve runs it) on 127.0.0.1; clients in separate"
            " processes."
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"  machine: {os.cpu_count()} cores (shared; load average {load})")
        raise_fd_limit()  # Ray's workers and HAProxy inherit it
        with ray_server_process(args) as (_, info):
            print(f"  Ray Serve up in {info['start_s']:.0f} s")
            probe_scenario(args, info)
        return 0
    args.scenarios = args.scenarios or "idle,chat"
    args.connections = args.connections or (1000 if args.quick else 5000)
    args.hold = args.hold or (11.0 if args.quick else 20.0)
    args.duration = args.duration or (8.0 if args.quick else 20.0)
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}

    print(
        "bench/connections.py: one ingress process (uvicorn serving create_app over the fake"
        " engine, auth on) on 127.0.0.1;\n  clients in separate processes. Under Ray Serve the"
        " same app runs in the ingress replica (Serve's proxy in front is not measured)."
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"  machine: {os.cpu_count()} cores (shared; load average {load}),"
        f" Python {sys.version.split()[0]}"
    )
    # A fresh server per scenario, so one does not inherit the other's heap.
    if "idle" in scenarios:
        with server_process(args) as (server, info):
            print(f"  server: uvicorn ws={args.ws} ({info['ws_impl']}), pid {server.pid}")
            idle_scenario(args, server, info)
    if "chat" in scenarios:
        with server_process(args) as (server, info):
            chat_scenario(args, server, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
