"""Storage of conversations, background sessions, logs and revoked tokens, each
conversation, session and log entry owned by a client.

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
)
from chatfleet.serving.store._store import Store
from chatfleet.serving.store._url import resolve_url

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
    "head_revision",
    "resolve_url",
]
