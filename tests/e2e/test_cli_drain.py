"""SIGTERM to `chatfleet serve` drains: a real process tree (Ray, Serve, HAProxy).

Every stream in flight ends with its terminal event (none is simply cut), readiness
answers 503 during the drain, the exit status is 0, and no process of the run is
left behind: Ray's run under the test's own TMPDIR and HAProxy's config there too,
so a leftover names that folder on its command line (or shares the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
from tests.fakes.serve_process import ServeProcess, serve_processes
from tests.fakes.stream_ends import sse_events, ws_chat_frames

from chatfleet.serving._drain_request import DrainRequest

CHAT = [{"role": "user", "content": "Tell me a long story"}]


def _processes(run: ServeProcess) -> list[str]:
    """Processes of this run still alive: in its session, or naming its folder."""
    tmp = run.env["TMPDIR"]
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            if os.getsid(p.pid) == run.proc.pid or tmp in cmdline:
                found.append(f"{p.pid} {cmdline[:200]}")
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    runs: list[ServeProcess] = []
    with serve_processes(tmp_path) as start:

        def _serve(drain_timeout_s: float, **fake: Any) -> ServeProcess:
            # Short: Ray's unix sockets live under it (a 107-byte limit).
            tmp = Path(tempfile.mkdtemp(prefix="cfd", dir="/tmp"))
            config = tmp_path / f"app-{len(runs)}.yaml"
            model = {"name": "slow", "engine": "fake", "num_cpus": 0.1, "fake": fake}
            config.write_text(
                yaml.safe_dump({"models": [model], "server": {"drain_timeout_s": drain_timeout_s}})
            )
            env = {
                "TMPDIR": str(tmp),  # Ray's session folder, and the drain's files
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp / "haproxy" / "haproxy.cfg"),
            }
            runs.append(start("--no-auth", "--config", str(config), extra_env=env))
            return runs[-1]

        yield _serve
    for run in runs:
        for line in _processes(run):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(run.env["TMPDIR"], ignore_errors=True)


async def _openai_stream(url: str, started: asyncio.Event) -> str:
    """What ended the stream, as the official client saw it."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(model="slow", messages=CHAT, stream=True)
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                return f"finish:{chunk.choices[0].finish_reason}"
    except openai.APIError as exc:
        return f"error:{exc.message}"
    finally:
        await client.close()
    return "cut"


async def _generate(
    http: httpx.AsyncClient, started: asyncio.Event
) -> list[tuple[str | None, Any]]:
    body = ""
    async with http.stream("POST", "/api/generate", json={"model": "slow", "prompt": "Hi"}) as r:
        assert r.status_code == 200
        async for text in r.aiter_text():
            body += text
            if "text_chunk" in body:
                started.set()
    return sse_events(body)


async def _exit_status(run: ServeProcess, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while run.proc.poll() is None:
        assert time.monotonic() < deadline, run.output
        await asyncio.sleep(0.5)
    return run.proc.returncode


async def _left_behind(run: ServeProcess, within_s: float = 15) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := _processes(run)) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    return left


async def test_sigterm_during_20_streams_ends_each_with_its_terminal_event(serve: Any) -> None:
    run = serve(3.0, reply_tokens=2000, tokens_per_second=5)
    await asyncio.to_thread(run.wait_ready)
    started = [asyncio.Event() for _ in range(20)]
    async with httpx.AsyncClient(base_url=run.url, timeout=120) as http:
        tasks: list[asyncio.Task[Any]] = []
        for i, event in enumerate(started):
            if i < 8:
                tasks.append(asyncio.create_task(_openai_stream(run.url, event)))
            elif i < 16:
                tasks.append(asyncio.create_task(_generate(http, event)))
            else:
                tasks.append(asyncio.create_task(ws_chat_frames(run.url, event)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        assert not any(t.done() for t in tasks)
        # The check for leftovers sees this run's processes, HAProxy included.
        alive = _processes(run)
        assert any("haproxy" in p for p in alive) and any("raylet" in p for p in alive), alive

        run.proc.send_signal(signal.SIGTERM)
        # Each of the two ingress replicas looks for the drain request every 0.2 s: once
        # both say they began (their .draining files), neither takes new work.
        request = DrainRequest(int(run.url.rsplit(":", 1)[1]), Path(run.env["TMPDIR"]))
        for _ in range(100):
            if request.requested() and not request.not_draining():
                break
            await asyncio.sleep(0.1)
        assert request.requested() and not request.not_draining(), run.output
        for _ in range(4):  # whichever replica HAProxy picks
            not_ready = await http.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["draining"] is True
            refused = await http.post("/api/generate", json={"model": "slow", "prompt": "Hi"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"

        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)

    openai_ends, generate_ends, ws_ends = results[:8], results[8:16], results[16:]
    assert all(end.startswith("error:") and "shutting down" in end for end in openai_ends)
    for events in generate_ends:
        assert events[-2][0] == "error"
        assert events[-2][1]["error"]["code"] == "shutting_down"
        assert (events[-1][0], events[-1][1]["finish_reason"]) == ("end_stream", "interrupted")
    for frames, close_code in ws_ends:
        codes = [f.get("code") for f in frames if f["type"] == "error"]
        assert "shutting_down" in codes
        assert close_code == 1001

    assert await _exit_status(run) == 0, run.output
    assert "shutting down..." in run.output and "stopped." in run.output
    assert "Traceback" not in run.output
    assert await _left_behind(run) == []


async def test_streams_that_finish_within_the_drain_complete_normally(serve: Any) -> None:
    run = serve(60.0, reply_tokens=30, tokens_per_second=10)
    await asyncio.to_thread(run.wait_ready)
    started = [asyncio.Event() for _ in range(4)]
    async with httpx.AsyncClient(base_url=run.url, timeout=120) as http:
        tasks = [asyncio.create_task(_openai_stream(run.url, e)) for e in started[:2]]
        tasks += [asyncio.create_task(_generate(http, e)) for e in started[2:]]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        run.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)

    assert all(end in ("finish:stop", "finish:length") for end in results[:2]), results[:2]
    for events in results[2:]:
        assert "error" not in [kind for kind, _ in events]
        assert events[-1][0] == "end_stream"
        assert events[-1][1]["finish_reason"] in ("stop", "length")
    assert await _exit_status(run) == 0, run.output
    assert "drain incomplete" not in run.output
    assert await _left_behind(run) == []


async def test_a_second_signal_stops_at_once_and_still_leaves_nothing_behind(serve: Any) -> None:
    run = serve(60.0, reply_tokens=2000, tokens_per_second=5)
    await asyncio.to_thread(run.wait_ready)
    started = asyncio.Event()
    async with httpx.AsyncClient(base_url=run.url, timeout=120) as http:
        stream = asyncio.create_task(_generate(http, started))
        await asyncio.wait_for(started.wait(), 120)
        run.proc.send_signal(signal.SIGINT)
        while "draining" not in run.output:  # noqa: ASYNC110 (a log file)
            await asyncio.sleep(0.2)
        run.proc.send_signal(signal.SIGINT)  # no drain, no serve.shutdown: Ray stops now
        assert await _exit_status(run) == 0, run.output
        with contextlib.suppress(httpx.HTTPError):
            await asyncio.wait_for(stream, 60)
    assert await _left_behind(run) == []
