"""The open-files limit ``chatfleet serve`` starts Ray with, and the sockets it holds.

Every socket is a file: HAProxy holds two a connection (the client's and the ingress
replica's side) and the ingress replica one. Ray's workers and the HAProxy one of them
spawns inherit the limit of the process that ran ``ray.init``, so it is raised there,
before Ray starts. A shell's default soft limit (1,024) or a container's hard one
(often 20,000 or 65,536) would otherwise cap WebSockets far below
``websocket.max_connections`` (10,000 per ingress replica by default).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

from chatfleet.serving.config import AppConfig

logger = logging.getLogger(__name__)

#: HAProxy's ceiling on its own maxconn (Serve's HAProxy config has a single process).
HAPROXY_MAX_CONNECTIONS = 65_536
#: Files HAProxy keeps besides its connections: listeners, its stats and metrics ports.
_HAPROXY_SPARE_FILES = 256
#: Files an ingress replica keeps besides its sockets: Ray's and gRPC's connections and
#: pipes, logs, the store's database, the relay links to engine replicas.
_INGRESS_SPARE_FILES = 1_024


def haproxy_files(connections: int) -> int:
    """The file limit HAProxy needs to start with ``maxconn connections``: two files a
    connection, half a one more for its splice pipes (maxconn / 4 of them, two files
    each), and its listeners. HAProxy refuses to start when the hard limit is lower."""
    return connections * 5 // 2 + _HAPROXY_SPARE_FILES


def haproxy_connections(files: int) -> int:
    """The largest maxconn HAProxy starts with under a hard limit of ``files``."""
    return max(1_024, min(HAPROXY_MAX_CONNECTIONS, (files - _HAPROXY_SPARE_FILES) * 2 // 5))


def _connections(config: AppConfig) -> int:
    """Connections the node's front door holds when every ingress replica is full: its
    sockets and its HTTP budget (sockets must not take the requests' share)."""
    replica = config.websocket.max_connections + config.ingress.max_ongoing_requests
    return replica * config.ingress.num_replicas


def files_needed(config: AppConfig) -> int:
    """The open-files limit at which nothing but ``config`` caps sockets on this node."""
    ingress = (
        config.websocket.max_connections
        + config.ingress.max_ongoing_requests
        + _INGRESS_SPARE_FILES
    )
    return max(haproxy_files(_connections(config)), ingress)


def socket_capacity(config: AppConfig, files: int) -> int:
    """WebSockets each ingress replica can hold under an open-files limit of ``files``
    while its HTTP budget stays free: the lower of HAProxy's and the replica's share."""
    replicas = config.ingress.num_replicas
    budget = config.ingress.max_ongoing_requests
    through_haproxy = haproxy_connections(files) // replicas - budget
    in_replica = files - _INGRESS_SPARE_FILES - budget
    return max(0, min(through_haproxy, in_replica, config.websocket.max_connections))


@dataclass(frozen=True)
class FileLimit:
    """The open-files limit after `raise_file_limit`, and what it was asked for."""

    soft: int
    hard: int
    wanted: int
    #: Why the hard limit stayed below ``wanted`` (None when it did not).
    refused: str | None = None


def _kernel_ceiling() -> int:
    """No process may raise its limit over fs.nr_open (1,048,576 unless tuned)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1_048_576


def raise_file_limit(wanted: int) -> FileLimit:
    """Raise this process's open-files limit to ``wanted`` (its children inherit it).

    The soft limit goes up to the hard one, and the hard one up to ``wanted`` when the
    process may (root, or CAP_SYS_RESOURCE); otherwise it stays where it is, and the
    result says why. A limit already above ``wanted`` is kept (never lowered).
    """
    ceiling = _kernel_ceiling()
    wanted = min(wanted, ceiling)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = ceiling  # what the kernel lets a file-descriptor number reach
    refused = None
    if hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError) as exc:  # EPERM: CPython raises ValueError
            refused = str(exc)
        else:
            soft = hard = wanted
    if soft != hard:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
        soft = hard
    return FileLimit(soft=soft, hard=hard, wanted=wanted, refused=refused)


def capacity_warning(config: AppConfig, limit: FileLimit) -> str | None:
    """What to tell the user when the file limit caps sockets under the configured
    ``websocket.max_connections``, and the fix; None when it does not."""
    capacity = socket_capacity(config, limit.hard)
    wanted = config.websocket.max_connections
    if capacity >= wanted:
        return None
    why = f"; raising it was refused: {limit.refused}" if limit.refused else ""
    return (
        f"the open-files limit ({limit.hard}{why}) caps WebSockets at {capacity} per"
        f" ingress replica, under websocket.max_connections ({wanted}); raise it with"
        f" `ulimit -n {limit.wanted}` before chatfleet serve (it needs root with"
        f" CAP_SYS_RESOURCE; in a container, `--ulimit nofile={limit.wanted}`; in a"
        " systemd unit, LimitNOFILE=)"
    )
