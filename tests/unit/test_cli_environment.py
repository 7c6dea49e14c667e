"""What `chatfleet serve` sets up for Ray Serve before it starts Ray."""

from __future__ import annotations

import os

import pytest

from chatfleet.serving import cli


def test_haproxy_fronts_serve_when_its_binary_exists() -> None:
    env, front = cli.serve_environment({})
    assert front == "HAProxy"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
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
    assert env == {}
    env, _ = cli.serve_environment({"RAY_SERVE_HAPROXY_STATS_PORT": "9999"})
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env  # kept as the user set it


def test_without_haproxy_serve_keeps_its_python_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_haproxy_binary", lambda: None)
    env, front = cli.serve_environment({})
    assert front == "Ray Serve's proxy (no HAProxy binary found)"
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_a_bad_metrics_port_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--engine", "fake", "--metrics-port", "0"]) == 2
    assert "--metrics-port 0: not a port" in capsys.readouterr().err
