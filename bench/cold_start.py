"""Cold-start bench: time to first token of a model scaled to zero vs the same model warm.

Run from the repository root::

    .venv/bin/python bench/cold_start.py             # 3 rounds (about 2 minutes)
    .venv/bin/python bench/cold_start.py --rounds 5

Starts chatfleet as ``chatfleet serve`` does (bench/_chatfleet_server.py, a private Ray)
with one fake model that scales to zero (``autoscaling.min_replicas: 0``, idle 2 s
before the last replica goes). Each round waits until the model is at zero, streams
``/v1/chat/completions`` and records when the ``: loading model`` notice and the first
token arrive (cold), then at once streams again (warm, the replica just started). A
request that got no notice did not find the model at zero: the round waits longer
and tries again. Prints figures only, never asserts timings.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib `operator`: keep bench/ off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
IDLE_S = 2.0
CONFIG = {
    "auth": {"enabled": False},
    "models": [
        {
            "name": "cold",
            "engine": "fake",
            "fake": {"reply_tokens": 32, "tokens_per_second": 200},
            "autoscaling": {
                "min_replicas": 0,
                "max_replicas": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": IDLE_S,
                "downscale_to_zero_delay_s": IDLE_S,
                "cold_start_timeout_s": 300,
            },
        }
    ],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _stream(http: httpx.AsyncClient, url: str) -> tuple[float | None, float]:
    """(seconds to the loading notice or None, seconds to the first token) of one stream."""
    body = {
        "model": "cold",
        "stream": True,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    started = time.perf_counter()
    notice: float | None = None
    first: float | None = None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith(": loading model") and notice is None:
                notice = time.perf_counter() - started
            elif line.startswith("data: {") and first is None:
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    first = time.perf_counter() - started
    assert first is not None, "no token streamed"
    return notice, first


async def _run(url: str, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"notice": [], "cold": [], "warm": []}
    async with httpx.AsyncClient(timeout=360) as http:
        done = 0
        while done < rounds:
            await asyncio.sleep(IDLE_S + 8)  # idle long enough for Serve to remove the replica
            sent = time.time()
            notice, cold = await _stream(http, url)
            # To line up with the Serve controller's "Upscaling ..." log line.
            clock = time.strftime("%H:%M:%S", time.localtime(sent)) + f"{sent % 1:.3f}"[1:]
            if notice is None:
                print(f"  (the model was still up after {IDLE_S + 8:g} s idle: waiting longer)")
                await asyncio.sleep(10)
                continue
            _, warm = await _stream(http, url)
            figures["notice"].append(notice)
            figures["cold"].append(cold)
            figures["warm"].append(warm)
            done += 1
            print(
                f"  round {done} (sent {clock}): notice {notice * 1000:.0f} ms,"
                f" cold TTFT {cold:.2f} s, warm TTFT {warm * 1000:.0f} ms",
                flush=True,
            )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-P", str(HERE / "_chatfleet_server.py"), json.dumps(CONFIG), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"chatfleet did not start: {line!r}")
        print(f"chatfleet up in {line.split()[1]} s; {args.rounds} rounds", flush=True)
        figures = asyncio.run(_run(f"http://127.0.0.1:{port}", args.rounds))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(120)
    print("\n| | median | min | max |\n|---|---|---|---|")
    for name, label in (
        ("notice", "`: loading model` notice"),
        ("cold", "first token from zero"),
        ("warm", "first token, warm"),
    ):
        values = figures[name]
        print(
            f"| {label} | {statistics.median(values):.3f} s | {min(values):.3f} s"
            f" | {max(values):.3f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
