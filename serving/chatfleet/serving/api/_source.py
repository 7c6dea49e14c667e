"""Where a request comes from, as far as the ingress can tell (for limits per address).

Behind proxies the peer is the nearest proxy; with ``auth.guessing.forwarded_hops``
set to the number of proxies that append the client's address to X-Forwarded-For,
the address the outermost of them appended is used. Ray Serve's own HAProxy does
not append (it passes the header through), so count only the proxies in front of it.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection


def source_address(connection: HTTPConnection, forwarded_hops: int) -> str:
    """The address a request comes from: the peer's, or with ``forwarded_hops`` proxies
    that append to X-Forwarded-For, the entry the outermost of them appended (entries
    left of it are the client's to choose, so they are never believed)."""
    if forwarded_hops > 0:
        forwarded = [
            entry.strip()
            for value in connection.headers.getlist("x-forwarded-for")
            for entry in value.split(",")
            if entry.strip()
        ]
        if len(forwarded) >= forwarded_hops:
            return forwarded[-forwarded_hops]
    client = connection.client
    return client.host if client is not None else "unknown"
