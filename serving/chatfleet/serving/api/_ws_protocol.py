"""The ``WS /ws/chat`` protocol: its frames, the ``chat`` frame's model, its close codes.

Frames are JSON text. Server to client::

    connection_ack  {client_id, session_id, ping_interval_s, max_message_bytes}
    token           {content, token, kind: "text" | "thinking", conversation_id}
    complete        {conversation_id, total_tokens, latency_ms, finish_reason, model}
    error           {error, code[, retry_after][, conversation_id]}  (the connection stays up)
    ping {timestamp} | pong {timestamp}

Client to server::

    chat    {content, conversation_id?, model?, system?, max_tokens?, temperature?, top_p?,
             stop?, seed?}
    cancel  (stop the reply that is streaming; it completes with finish_reason "cancelled")
    pong {timestamp?} (the answer to a server ping) | ping {timestamp?} (answered with a pong)

A ``token`` frame carries its text twice: in ``content`` (chatfleet's name) and in
``token`` (the name the chat gateway's clients read). ``timestamp`` is Unix seconds;
a ``pong`` answering a client's ``ping`` echoes its timestamp.

One reply streams at a time per connection: a ``chat`` that arrives while one
is streaming is refused with an ``error`` frame (code ``busy``); send ``cancel``
first to interrupt. The connection keeps its conversations: a ``chat`` without
``conversation_id`` (or with ``""``) continues the connection's own, whose id is
its ``session_id``; with one, it continues that conversation (a connection keeps
up to `MAX_CONVERSATIONS`, the least recently used is forgotten). Each is bounded
by ``server.max_messages``. ``total_tokens`` counts the reply's generated tokens
(thinking included).

The token holds for the whole connection: when it expires, the connection gets
an ``error`` frame (``token_expired``) and is closed with 1008 (reason "token
has expired; refresh it and reconnect"); when it is revoked, the same with
``token_revoked`` (at once through this replica, within ``auth.socket_recheck_s``
through another). A reply streaming then is cancelled.

Malformed frames (not JSON, unknown type, missing content, over
``websocket.max_message_bytes``, binary) get an ``error`` frame and the
connection stays up. The server sends ``ping`` every
``websocket.ping_interval_s``; a peer that doesn't ``pong`` within
``websocket.pong_timeout_s`` is closed with code 4408. When the client goes
away, its generation is cancelled (the engine stops). Close codes: 1008 bad
token (at connect, from the auth middleware) or a token that expired or was
revoked, 1013 too many connections or rate-limited, 4408 pong timeout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from chatfleet.serving.api._auth import WS_POLICY_VIOLATION, WS_TRY_AGAIN_LATER
from chatfleet.serving.api._schemas import SamplingFields
from chatfleet.serving.errors import AuthenticationError, ChatfleetError, Overloaded

WS_PONG_TIMEOUT = 4408
#: Conversations one connection keeps (each bounded by ``server.max_messages``).
MAX_CONVERSATIONS = 8
INVALID_FRAME = "invalid_frame"
BUSY = "busy"


def ws_close_code(exc: ChatfleetError) -> int:
    """The close code for an error that ends a connection."""
    if isinstance(exc, AuthenticationError):
        return WS_POLICY_VIOLATION
    if isinstance(exc, Overloaded):
        return WS_TRY_AGAIN_LATER
    return 1011  # internal error


class ChatFrame(SamplingFields):
    """A client's ``chat`` frame."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["chat"]
    content: str = Field(min_length=1, description="The user's message.")
    conversation_id: str | None = Field(
        None,
        max_length=200,
        description="The conversation this continues; empty: the connection's own.",
    )
    model: str | None = Field(None, description="Model name or 'auto'; empty: the default.")
    system: str | None = Field(None, description="A system prompt for this turn.")
