"""``kill -9`` of ``chatfleet serve`` (the whole process tree, as a node or a pod dies)
during a background session and a streamed reply; restarted on the same store, the
session is ``interrupted`` and the reply is marked incomplete, their text kept, within
the documented bound (``store.lease_s + store.heartbeat_s`` after the crash, or at
once when a replica starts after the lease lapsed). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.fakes.postgres import MISSING_REASON, PostgresCluster, postgres_cluster
from tests.fakes.required import missing
from tests.fakes.serve_process import ServeProcess, serve_processes

HEARTBEAT_S, LEASE_S = 1.0, 4.0
#: The documented bound after the replica died, plus room for a loaded machine.
WITHIN_S = LEASE_S + HEARTBEAT_S + 60


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    # Serve's own proxy: what fronts the port is not what this test is about.
    with serve_processes(tmp_path, {"RAY_SERVE_ENABLE_HA_PROXY": "0"}) as start:
        yield start


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster | None]:
    yield from postgres_cluster()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/store.db"
    cluster: PostgresCluster | None = request.getfixturevalue("pg_cluster")
    if cluster is None:
        missing(MISSING_REASON)
    return asyncio.run(cluster.new_database())


def write_config(tmp_path: Path, store_url: str) -> Path:
    config = {
        "models": [
            {
                "name": "slow",
                "engine": "fake",
                "fake": {"reply_tokens": 4000, "tokens_per_second": 20},
            }
        ],
        "auth": {"enabled": False},
        "store": {"url": store_url, "heartbeat_s": HEARTBEAT_S, "lease_s": LEASE_S},
    }
    path = tmp_path / "chatfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ingress_replicas(session: int) -> list[int]:
    """The ingress replicas' processes of the server whose process session is ``session``."""
    listing = subprocess.run(
        ["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in listing.splitlines():
        pid, sid, args = line.split(None, 2)
        if int(sid) == session and "ServeReplica" in args and ":ingress" in args:
            found.append(int(pid))
    assert found, listing
    return found


def poll(probe: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"not within {within} s")


@pytest.mark.ray
def test_kill_9_then_restart_marks_the_cut_off_work_interrupted(
    start: Any, tmp_path: Path, store_url: str
) -> None:
    config = write_config(tmp_path, store_url)
    first = start("--config", str(config))
    output = first.wait_for("serving on")
    assert first.proc.poll() is None, output

    with httpx.Client(base_url=first.url, timeout=60) as http:
        session = http.post("/api/sessions", json={"message": "go on", "model": "slow"}).json()
        with http.stream(
            "POST",
            "/v1/messages",
            json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ) as reply:
            meta: dict[str, Any] = {}
            lines = reply.iter_lines()
            for line in lines:
                if line.startswith("data: ") and not meta:
                    meta = json.loads(line.removeprefix("data: "))
                    break
            # Until both have checkpointed some text (every second).
            poll(
                lambda: (
                    http.get(f"/api/sessions/{session['id']}").json()["response"]
                    and http.get(f"/v1/conversations/{meta['conversation_id']}").json()["messages"][
                        -1
                    ]["content"]
                ),
                within=60,
            )
            # The replica writing first (else it may see the proxy go and store the
            # reply as cancelled by the client), then the whole tree: no shutdown at all.
            for pid in ingress_replicas(first.proc.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(first.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            first.proc.wait()

    second = start("--config", str(config))
    output = second.wait_for("serving on")
    assert second.proc.poll() is None, output
    with httpx.Client(base_url=second.url, timeout=60) as http:
        stored = poll(
            lambda: (
                (s := http.get(f"/api/sessions/{session['id']}").json())["status"] == "interrupted"
                and s
            ),
            within=WITHIN_S,
        )
        recovered_after = time.monotonic() - killed_at
        conversation = http.get(f"/v1/conversations/{meta['conversation_id']}").json()
        running = http.get("/api/sessions", params={"status": "running"}).json()["data"]
        second.proc.send_signal(signal.SIGINT)
        second.proc.wait(timeout=120)

    print(f"interrupted {recovered_after:.1f} s after kill -9 (restart included)")
    assert stored["response"] and "replica" in stored["error"]
    assert stored["finished_at"] is not None
    assert running == []
    reply_message = conversation["messages"][-1]
    assert reply_message["role"] == "assistant"
    assert reply_message["status"] == "interrupted"
    assert reply_message["content"]  # what was said is kept
    assert reply_message["error"].startswith("incomplete")
