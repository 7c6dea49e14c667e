"""The affinity key of a request: which requests should share a replica's KV cache.

A conversation's turns resend its whole history, so the KV cache of turn n holds the
prefix of turn n + 1: the turns belong on one replica. The key is the conversation id
when the client gives one (scoped by its owner), else a hash of the conversation's
opening, the messages up to its first user message, cut at ``prefix_chars``: it is the
same for every later turn, and for prompts on one long shared system prompt. The
replica the key maps to is chosen under Ray Serve (``chatfleet.serving.app``).
"""

from __future__ import annotations

import hashlib

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.protocol import Message

__all__ = ["affinity_key"]

# Between fields of the hashed text: characters a message's content cannot confuse.
_FIELD = "\x1f"
_RECORD = "\x1e"


def affinity_key(
    model: ModelConfig,
    messages: list[Message],
    conversation: tuple[str | None, str] | None = None,
) -> str:
    """``model``'s key for a request; empty when the model does not route by affinity."""
    if not model.routes_by_affinity():
        return ""
    if conversation is not None:
        owner, conversation_id = conversation
        text = f"conversation{_FIELD}{owner or ''}{_FIELD}{conversation_id}"
    else:
        text = "prefix" + _FIELD + _opening(messages)[: model.affinity.prefix_chars]
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _opening(messages: list[Message]) -> str:
    """The messages up to and including the first user message, as one text."""
    parts = []
    for message in messages:
        parts.append(f"{message.role}{_FIELD}{message.content}{_RECORD}")
        if message.role == "user":
            break
    return "".join(parts)
