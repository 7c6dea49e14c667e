"""What `chatfleet serve` sets up for Ray Serve before it starts Ray."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from tests.fakes.ports import free_port

from chatfleet.serving import _serve_env, cli


def test_haproxy_fronts_serve_when_its_binary_exists() -> None:
    env, front = cli.serve_environment({})
    assert front == "HAProxy"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # Replicas (and the HAProxy one of them spawns) at normal priority, not Ray's 15.
    assert env["RAY_worker_niceness"] == "0"
    assert 1 <= int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) <= min(4, len(os.sched_getaffinity(0)))
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    # Fresh ports, not Serve's fixed 8404/9101/8500 a second local server would collide on.
    ports = {
        env[name]
        for name in (
            "RAY_SERVE_HAPROXY_STATS_PORT",
            "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        )
    }
    assert len(ports) == 3
    assert not ports & {"8404", "9101", "8500"}


def test_the_users_variables_win() -> None:
    env, front = cli.serve_environment(
        {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    )
    assert front == "Ray Serve's proxy"
    assert env == {"RAY_worker_niceness": "0"}
    env, _ = cli.serve_environment({"RAY_worker_niceness": "5"})
    assert "RAY_worker_niceness" not in env
    env, _ = cli.serve_environment({"RAY_SERVE_HAPROXY_STATS_PORT": "9999"})
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env  # kept as the user set it


def test_without_haproxy_serve_keeps_its_python_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_serve_env, "_haproxy_binary", lambda: None)
    env, front = cli.serve_environment({})
    assert front == "Ray Serve's proxy (no HAProxy binary found)"
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}


def test_a_bad_metrics_port_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--engine", "fake", "--metrics-port", "0"]) == 2
    assert "--metrics-port 0: not a port" in capsys.readouterr().err


def test_haproxy_takes_as_many_sockets_as_its_file_limit_allows(tmp_path: Path) -> None:
    env, _ = cli.serve_environment({})
    maxconn = int(env["RAY_SERVE_HAPROXY_MAXCONN"])
    assert maxconn > 4096  # Serve's default, under the 10,000 sockets a replica takes
    # HAProxy refuses to start when its maxconn needs more files than it may open.
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    maxconn {maxconn}\n"
        "defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n"
        "    timeout connect 5s\n"
        f"frontend f\n    bind 127.0.0.1:{free_port()}\n    default_backend b\n"
        "backend b\n    server s 127.0.0.1:9\n"
    )
    proc = subprocess.Popen(
        [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-f", str(config), "-db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(2)  # still serving: it started
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert b"ALERT" not in out, out.decode()


def test_haproxys_ports_lie_where_ray_and_the_kernel_pick_none() -> None:
    # Ray's daemons bind random ports in the ephemeral range while HAProxy waits to
    # start: a port from there was taken now and then before HAProxy bound it.
    env, _ = cli.serve_environment({})
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for name in (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    ):
        port = int(env[name])
        assert not low <= port <= high, (name, port)
        assert port >= 20_000, (name, port)  # above Ray's workers' ports


def test_a_port_taken_on_another_address_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    # HAProxy binds all addresses: a port another process holds on one of them only
    # (Ray listens on the node's address) would make it fail to start.
    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(_serve_env, "_QUIET_PORTS", range(taken, taken + 1))
        monkeypatch.setattr(_serve_env, "_ephemeral_ports", lambda: range(0))
        assert _serve_env.free_ports(2)[0] != taken
