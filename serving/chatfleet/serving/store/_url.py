"""Where the database is: the configured URL, an environment variable, or a local SQLite file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from chatfleet.serving.config import StoreConfig

DATA_DIR_ENV = "CHATFLEET_DATA_DIR"
SQLITE_FILE = "chatfleet.db"

# Plain driver names (what a Secret or an operator usually holds) -> async drivers.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def data_dir(config: StoreConfig, environ: Mapping[str, str] | None = None) -> Path:
    """The local data folder: config, then ``$CHATFLEET_DATA_DIR``, then ~/.local/share."""
    env = os.environ if environ is None else environ
    folder = config.data_dir or env.get(DATA_DIR_ENV)
    if folder:
        return Path(folder).expanduser()
    return Path.home() / ".local" / "share" / "chatfleet"


def resolve_url(config: StoreConfig, environ: Mapping[str, str] | None = None) -> URL:
    """The async SQLAlchemy URL of the store.

    Raises ``ValueError`` when ``url_env`` names a variable that is not set, or
    when the URL is not a SQLite or PostgreSQL one.
    """
    env = os.environ if environ is None else environ
    if config.url is not None:
        raw = config.url.get_secret_value()
    elif config.url_env:
        raw = env.get(config.url_env, "")
        if not raw:
            raise ValueError(
                f"store.url_env names {config.url_env!r}, but that environment variable"
                " is not set (in a cluster it comes from the database Secret)"
            )
    else:
        return URL.create("sqlite+aiosqlite", database=str(data_dir(config, env) / SQLITE_FILE))
    try:
        url = make_url(raw)
    except Exception as exc:  # sqlalchemy raises ArgumentError; never echo the URL (secret)
        raise ValueError("store URL is not a valid database URL") from exc
    url = url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"store URL: unsupported database {url.get_backend_name()!r}"
            " (use sqlite+aiosqlite:// or postgresql+asyncpg://)"
        )
    return url


def is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
