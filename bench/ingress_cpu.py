"""Ingress CPU per streamed request: the ASGI app alone, in one process, by revision.

Run from the repository root::

    .venv/bin/python bench/ingress_cpu.py                       # the working tree
    .venv/bin/python bench/ingress_cpu.py --revs 5eea4d9,HEAD   # revisions side by side

bench/gateway.py measures the whole house on Ray Serve, where the ingress's CPU per
request also holds Ray's handle calls and background threads, and moves with whatever
else the machine runs. This bench isolates what chatfleet's own request path costs:
``create_app`` (default store, auth off, as gateway.py configures it) is called
directly as an ASGI app with ``POST /api/generate`` and ``/v1/chat/completions``
(streamed), its engine client replaying what the relay hands the ingress (the first
token alone, then the rest in two batches, each one merged chunk; ``--unmerged``: a
chunk per token). The figure is CPU time
(``time.process_time``) per request, so a loaded machine changes it little; each
revision runs in its own process (``git archive`` of ``serving/``), the revisions
alternating every round. It prints figures, never asserts.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# As bench/gateway.py: bench/ may hold scripts named like stdlib modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

PATHS = ("/api/generate", "/v1/chat/completions")


def _body(path: str, tokens: int) -> bytes:
    if path == "/api/generate":
        return json.dumps({"model": "fake0", "prompt": "benchmark", "max_tokens": tokens}).encode()
    messages = [{"role": "user", "content": "benchmark"}]
    body = {"model": "fake0", "messages": messages, "max_tokens": tokens, "stream": True}
    return json.dumps(body).encode()


async def _measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """In the child: ms of CPU per request, per path, one figure per repeat."""
    from chatfleet.serving.config import AppConfig
    from chatfleet.serving.protocol import Chunk, Usage
    from chatfleet.serving.store import Store

    try:
        from chatfleet.serving.api import Metrics, create_app
    except ImportError:  # a revision before Metrics was exported
        from chatfleet.serving.api import create_app
        from chatfleet.serving.api._metrics import Metrics

    n = args.tokens
    # As coalesce() hands them on: a batch's tokens of one kind merged into one chunk.
    # Built once: chunks are immutable, and making them is the engine's cost.
    second, third = n // 2 - 1, n - n // 2
    replies = [
        [Chunk("text", "tok ")],
        [Chunk("text", "tok " * second, second)],
        [Chunk("text", "tok " * third, third, finish_reason="length", usage=Usage(3, n))],
    ]
    if args.unmerged:  # one chunk per token, as an engine without coalescing would
        replies = [[Chunk("text", "tok ")] * len(b[0].text.split()) for b in replies]
        replies[-1][-1] = Chunk("text", "tok ", finish_reason="length", usage=Usage(3, n))

    class Replay:
        def batches(self, request: Any) -> AsyncGenerator[list[Any], None]:
            async def replay() -> AsyncGenerator[list[Any], None]:
                for batch in replies:
                    yield batch
                    await asyncio.sleep(0)

            return replay()

        async def is_ready(self) -> bool:
            return True

    model = {
        "name": "fake0",
        "engine": "fake",
        "defaults": {"max_tokens": n, "max_tokens_limit": max(4096, n)},
    }
    extra = {"auth": {"enabled": False}} if "auth" in AppConfig.model_fields else {}
    config = AppConfig.model_validate({"models": [model], **extra})
    app = create_app(config, {"fake0": Replay()}, store=Store(config.store), metrics=Metrics())

    async def request(path: str, body: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 5555),
            "headers": [
                (b"host", b"127.0.0.1:8000"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "state": {},
        }
        done = asyncio.Event()
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        done.set()
        if status != 200:
            raise RuntimeError(f"{path} answered {status}")

    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    life = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, startup.get, events.put)
    )
    await startup.put({"type": "lifespan.startup"})
    assert (await events.get())["type"] == "lifespan.startup.complete"
    figures: dict[str, list[float]] = {}
    for path in PATHS:
        body = _body(path, n)
        await asyncio.gather(*(request(path, body) for _ in range(args.concurrency)))  # warm-up
        for _ in range(args.repeats):
            started = time.process_time()
            for _ in range(args.requests // args.concurrency):
                await asyncio.gather(*(request(path, body) for _ in range(args.concurrency)))
            served = args.requests // args.concurrency * args.concurrency
            figures.setdefault(path, []).append((time.process_time() - started) / served * 1e3)
    await startup.put({"type": "lifespan.shutdown"})
    await events.get()
    await life
    return figures


def _source(rev: str) -> tuple[str, Path]:
    """(short sha, root holding ``chatfleet/serving``) of ``rev``; "." is the working tree."""
    repo = Path(_HERE).parent
    if rev == ".":
        return "worktree", repo / "serving"
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
    return sha, dest / "serving"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--revs",
        default=".",
        help="Comma-separated git revisions; '.' (the default) is the working tree.",
    )
    p.add_argument("--rounds", type=int, default=3, help="Processes per revision, alternating.")
    p.add_argument("--requests", type=int, default=640, help="Requests per repeat and path.")
    p.add_argument("--repeats", type=int, default=3, help="Figures per process and path.")
    p.add_argument("--concurrency", type=int, default=32, help="Requests in flight at once.")
    p.add_argument("--tokens", type=int, default=256, help="Tokens per reply.")
    p.add_argument(
        "--unmerged", action="store_true", help="A chunk per token instead of one per batch."
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_measure(args))))
        return 0
    sources = [_source(rev.strip()) for rev in args.revs.split(",") if rev.strip()]
    samples: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = sources if round_ % 2 == 0 else list(reversed(sources))
        for sha, root in order:
            env = dict(os.environ, CHATFLEET_DATA_DIR=tempfile.mkdtemp(prefix="chatfleet-cpu-"))
            env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
            child = [sys.executable, "-P", __file__, "--child", *(argv or sys.argv[1:])]
            out = subprocess.run(child, env=env, check=True, capture_output=True, text=True)
            for path, figures in json.loads(out.stdout.splitlines()[-1]).items():
                samples.setdefault((sha, path), []).extend(figures)
    print(
        f"ingress CPU per streamed request ({args.tokens} tokens, {args.concurrency} at once),"
        f" ms: median [min-max] of {args.rounds} processes x {args.repeats} repeats"
    )
    for path in PATHS:
        for sha, _ in sources:
            xs = samples[(sha, path)]
            print(
                f"  {path:<22} {sha:>9}: {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
