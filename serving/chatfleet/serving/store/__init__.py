"""Storage of conversations, background sessions, logs, revoked tokens and usage,
each conversation, session, log entry and usage row owned by a client.

SQLAlchemy 2 (async) over SQLite (default, a file under the data directory) or
PostgreSQL (``postgresql+asyncpg://``, in a cluster from a Secret through
``store.url_env``). The schema is managed by Alembic migrations shipped in this
package; `Store.start` applies them when ``migrate_on_start`` is set, and
``chatfleet db upgrade`` applies them explicitly.
"""

from chatfleet.serving.store._migrations import head_revision
from chatfleet.serving.store._records import (
    FINISHED_SESSION_STATUSES,
    LOCAL_OWNER,
    Conversation,
    LogEntry,
    MessageRole,
    MessageStatus,
    Session,
    SessionStatus,
    StoredMessage,
    StoredResponse,
)
from chatfleet.serving.store._store import Store
from chatfleet.serving.store._url import resolve_url
from chatfleet.serving.store._usage import UsageEntry

__all__ = [
    "FINISHED_SESSION_STATUSES",
    "LOCAL_OWNER",
    "Conversation",
    "LogEntry",
    "MessageRole",
    "MessageStatus",
    "Session",
    "SessionStatus",
    "Store",
    "StoredMessage",
    "StoredResponse",
    "UsageEntry",
    "head_revision",
    "resolve_url",
]
