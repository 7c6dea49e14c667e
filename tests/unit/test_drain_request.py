"""`chatfleet drain` (the preStop hook) and the files it asks the ingress replicas through."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from chatfleet.serving._drain_request import DrainRequest

CHATFLEET = [sys.executable, "-m", "chatfleet.serving.cli"]


def _drain(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [*CHATFLEET, "drain", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_drain_asks_every_replica_and_returns_once_all_are_drained(tmp_path: Path) -> None:
    files = DrainRequest(8123, root=tmp_path)
    files.register("replica-a")
    files.register("replica-b")
    proc = _drain(tmp_path, "--port", "8123", "--timeout", "30")
    deadline = time.monotonic() + 60
    while not files.requested():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    files.drained("replica-a")
    time.sleep(0.5)
    assert proc.poll() is None  # one replica is still draining
    assert files.pending() == ["replica-b"]
    files.drained("replica-b")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "draining" in out


def test_drain_gives_up_at_its_bound_with_status_1(tmp_path: Path) -> None:
    DrainRequest(8124, root=tmp_path).register(str(os.getpid()))  # a running process
    proc = _drain(tmp_path, "--port", "8124", "--timeout", "0")
    out, _ = proc.communicate(timeout=60)  # the bound: the timeout and the margin
    assert proc.returncode == 1
    assert f"drain incomplete on replicas {os.getpid()}" in out


def test_a_replica_that_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    files = DrainRequest(8127, root=tmp_path)
    files.register(str(gone.pid))  # e.g. a replica Serve replaced, or one that crashed
    assert files.pending() == []
    proc = _drain(tmp_path, "--port", "8127", "--timeout", "30")
    assert proc.wait(timeout=60) == 0


def test_nothing_to_drain_returns_at_once(tmp_path: Path) -> None:
    proc = _drain(tmp_path, "--port", "8125")
    assert proc.wait(timeout=60) == 0
    assert not DrainRequest(8125, root=tmp_path).requested()


def test_a_replica_watching_the_files_sees_the_request(tmp_path: Path) -> None:
    files = DrainRequest(8126, root=tmp_path)
    files.clear()
    files.register("1")
    asked = threading.Event()

    def replica() -> None:
        while not files.requested():
            time.sleep(0.01)
        asked.set()
        files.drained("1")

    thread = threading.Thread(target=replica)
    thread.start()
    files.request()
    assert files.wait(30)
    thread.join(30)
    assert asked.is_set() and files.pending() == []
    files.clear()
    assert not files.folder.exists()


def test_each_replica_says_when_it_began_to_drain(tmp_path: Path) -> None:
    files = DrainRequest(8128, root=tmp_path)
    files.register("replica-a")
    files.register("replica-b")
    assert files.not_draining() == ["replica-a", "replica-b"]
    files.request()
    files.draining("replica-b")
    assert files.not_draining() == ["replica-a"]  # a replica notices within its poll
    assert files.pending() == ["replica-a", "replica-b"]  # neither is done
    files.draining("replica-a")
    files.drained("replica-a")
    assert files.not_draining() == []
    assert files.pending() == ["replica-b"]
