"""CPU per request start, by process: `chatfleet serve` against the naive streamer.

Run from the repository root::

    .venv/bin/python bench/request_cpu.py                      # 3,000 requests each
    .venv/bin/python bench/request_cpu.py --requests 1000 --concurrency 32

Three servers: bench/aiperf.py's two (the naive streamer, and ``chatfleet serve
--no-auth`` with the fake model at its default settings: HAProxy, two ingress replicas,
an engine replica) and, between them, bench/_bare_serve.py: Ray Serve started as
``chatfleet serve`` starts it, with the same topology (two ingress replicas, one
streaming handle call to an engine replica) and none of chatfleet's code, the floor of
Serve's own request path. Each is sent the same requests from this process: streamed
``/v1/chat/completions`` of one token (what a request costs to start and finish, not to
stream), ``--concurrency`` at a time. The figure is the CPU time (``/proc``, user and
system) each of the server's processes used per request: its whole process tree, Ray's
daemons included, the client excluded. CPU time, not latency, so a busy machine changes
it little. When aiperf's streams restart together (every reply ends at the same time
at a fixed pace), each server has this much CPU per stream to spend before the last
first token goes out; with the client on the same two cores, that queue is most of
what chatfleet adds to the time to first token at 256 streams. It prints figures and
the ratios to the naive server; it asserts nothing.

``--revs 50aaffe,HEAD --rounds 4`` compares chatfleet revisions instead: each is
started from its own ``git archive`` of ``serving/`` (on ``PYTHONPATH``, as
bench/ingress_cpu.py does), the revisions alternating round after round, and the
medians are printed with their ranges. On this shared machine one run's figure moves
by a third from one hour to the next; revisions measured alternately in the same run
can be compared, single runs cannot.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# As bench/aiperf.py: bench/ holds scripts named like modules (operator.py, aiperf.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def _bench_module(script: str) -> Any:
    """A script of bench/, loaded by path: aiperf.py (its servers and their settings),
    ingress_cpu.py (its revision sources), _procs.py (CPU by process)."""
    name = "_bench_" + script.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, script))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_procs = _bench_module("_procs.py")


async def _send(port: int, model: str, requests: int, concurrency: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1,
        "stream": True,
    }
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                async with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        raise SystemExit(f"answered {r.status_code}: {await r.aread()!r}")
                    async for _ in r.aiter_bytes():
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(server: Any, model: str, args: argparse.Namespace) -> dict[str, float]:
    """ms of CPU per request, by process role, over ``args.requests`` requests."""
    asyncio.run(_send(server.port, model, args.warmup, args.concurrency))
    time.sleep(1)  # let warm-up's tails (usage flushes, metrics) pass
    before = _procs.processes()
    started = time.perf_counter()
    asyncio.run(_send(server.port, model, args.requests, args.concurrency))
    elapsed = time.perf_counter() - started
    after = _procs.processes()
    used = _procs.used(server.proc.pid, before, after)
    print(
        f"  {server.name}: {args.requests} requests in {elapsed:.1f} s"
        f" ({args.requests / elapsed:.0f}/s, {args.concurrency} at a time)"
    )
    return {name: cpu / args.requests * 1e3 for name, cpu in used.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=3000, help="Measured requests per server.")
    p.add_argument("--warmup", type=int, default=200, help="Requests before measuring.")
    p.add_argument("--concurrency", type=int, default=8, help="Requests in flight at once.")
    p.add_argument(
        "--revs",
        default="",
        help="Comma-separated git revisions of chatfleet to compare ('.' is the working"
        " tree), alternating; without it: naive, bare Ray Serve and the working tree.",
    )
    p.add_argument("--rounds", type=int, default=3, help="With --revs: runs per revision.")
    args = p.parse_args(argv)
    bench = _bench_module("aiperf.py")
    # aiperf.py's servers: the fake model at 50 tokens/s (one token: no pacing to wait).
    settings = argparse.Namespace(tps=50.0, tokens=256, chatfleet_settings="{}")
    if args.revs:
        return _compare_revisions(bench, settings, args)
    figures: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="chatfleet-request-cpu-") as workdir:
        for start in (bench.naive, bench.bare, lambda a: bench.chatfleet(a, Path(workdir))):
            server = start(settings)
            try:
                figures[server.name] = measure(server, bench.MODEL, args)
            finally:
                server.stop()
    print("\nCPU per request start (ms, /proc; one-token streamed chat completions):")
    totals = {}
    for name, used in figures.items():
        totals[name] = sum(used.values())
        print(f"  {name}: {totals[name]:.2f} ms in all")
        for role, ms in sorted(used.items(), key=lambda kv: -kv[1]):
            if ms >= 0.01:
                print(f"    {ms:6.2f}  {role}")
    if totals.get("naive"):
        print()
        for name in ("bare", "chatfleet"):
            print(f"  {name} / naive: {totals[name] / totals['naive']:.1f}x")
        print(
            f"  chatfleet - bare Ray Serve: {totals['chatfleet'] - totals['bare']:.2f} ms"
            " (what chatfleet adds to Serve's own request path)"
        )
    return 0


def _compare_revisions(bench: Any, settings: argparse.Namespace, args: argparse.Namespace) -> int:
    """chatfleet at each of ``args.revs``, alternating for ``args.rounds`` rounds."""
    ingress_cpu = _bench_module("ingress_cpu.py")
    sources = [ingress_cpu._source(rev.strip()) for rev in args.revs.split(",") if rev.strip()]
    figures: dict[str, list[dict[str, float]]] = {sha: [] for sha, _ in sources}
    base = os.environ.get("PYTHONPATH")
    try:
        for round_ in range(args.rounds):
            for sha, root in sources if round_ % 2 == 0 else reversed(sources):
                os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [base])])
                with tempfile.TemporaryDirectory(prefix="chatfleet-request-cpu-") as workdir:
                    server = bench.chatfleet(settings, Path(workdir))
                    server.name = f"chatfleet {sha}"
                    try:
                        figures[sha].append(measure(server, bench.MODEL, args))
                    finally:
                        server.stop()
    finally:
        if base is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = base
    print(
        f"\nCPU per request start (ms, /proc), median [min-max] of {args.rounds} alternated runs:"
    )
    for sha, runs in figures.items():
        parts = {
            "in all": [sum(run.values()) for run in runs],
            "ingress": [sum(v for k, v in run.items() if "ingress" in k) for run in runs],
            "engine": [sum(v for k, v in run.items() if "engine" in k) for run in runs],
        }
        print(
            f"  {sha:>9}: "
            + ", ".join(
                f"{part} {statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"
                for part, xs in parts.items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
