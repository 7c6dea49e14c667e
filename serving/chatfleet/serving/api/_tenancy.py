"""Who is asking: the `Caller` every handler reads its rights from.

Each conversation, session, log entry and usage row is owned by the client that
made it (its token's ``sub``). A caller sees and changes only its own; another
client's id is answered as not found (404), never as forbidden, so ids cannot be
probed. A token with the ``admin`` scope sees and manages everything (the
dashboard's view). With auth off (``--no-auth``) there is one trusted user: the
``local`` client, as an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from chatfleet.serving.api._auth import request_claims
from chatfleet.serving.store import LOCAL_OWNER

#: The scope that sees and manages every client's data.
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    client_id: str
    admin: bool

    @property
    def sees(self) -> str | None:
        """The owner to filter the store by: the caller's own id; ``None`` (all) for admins."""
        return None if self.admin else self.client_id

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.client_id


def caller_of(connection: HTTPConnection) -> Caller:
    """The caller of an HTTP request or a WebSocket, from its verified claims."""
    claims = request_claims(connection)
    if claims is None:
        return Caller(LOCAL_OWNER, admin=True)
    return Caller(claims.client_id, admin=ADMIN_SCOPE in claims.scopes)


async def _caller(connection: HTTPConnection) -> Caller:
    # Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a
    # thread hand-off per request (measurable CPU and latency on the streaming path).
    return caller_of(connection)


#: A handler parameter: ``caller: CallerDep``.
CallerDep = Annotated[Caller, Depends(_caller)]
