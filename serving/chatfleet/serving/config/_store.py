"""Storage of conversations, sessions, logs and revoked tokens."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_serializer

from chatfleet.serving.config._base import _Model


class StoreConfig(_Model):
    """Where conversations, sessions, logs and revoked tokens are kept."""

    url: SecretStr | None = Field(
        None,
        description="SQLAlchemy async URL (postgresql+asyncpg://..., sqlite+aiosqlite:///...)."
        " Empty: a SQLite file under the data directory. In a cluster, set url_env instead.",
    )
    url_env: str | None = Field(
        None, description="Name of the environment variable holding the URL (from a Secret)."
    )
    data_dir: str | None = Field(
        None,
        description="Folder of the default SQLite file; empty: $CHATFLEET_DATA_DIR or"
        " ~/.local/share/chatfleet.",
    )
    migrate_on_start: bool = Field(
        True, description="Apply Alembic migrations when the server starts."
    )
    history_limit: int = Field(
        200, ge=1, le=100_000, description="Most stored messages prepended to a conversation."
    )
    pool_size: int = Field(5, ge=1, le=200, description="Connections per replica (PostgreSQL).")

    @field_serializer("url", when_used="json")
    def _reveal_url(self, url: SecretStr | None) -> str | None:
        return url.get_secret_value() if url is not None else None
