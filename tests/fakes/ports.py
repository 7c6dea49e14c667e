"""Loopback ports for servers the tests start."""

from __future__ import annotations

from chatfleet.serving._serve_env import free_ports


def free_port() -> int:
    """A TCP port nothing listens on right now, on any address.

    Outside the kernel's ephemeral range, like the ports ``chatfleet serve`` gives
    HAProxy: a test's server often binds it after Ray started, whose daemons take
    random ports in that range meanwhile.
    """
    return free_ports(1)[0]
