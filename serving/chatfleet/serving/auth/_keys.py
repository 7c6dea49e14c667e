"""The HS256 signing key: from the environment (a Secret), else a local file made once."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from chatfleet.serving.config import AuthConfig

logger = logging.getLogger(__name__)

KEY_FILE = "jwt-signing-key"
DATA_DIR_ENV = "CHATFLEET_DATA_DIR"
# RFC 7518 §3.2: an HS256 key has at least 256 bits.
MIN_KEY_BYTES = 32


def data_dir(configured: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The local data folder: ``configured``, else ``$CHATFLEET_DATA_DIR``, else
    ``~/.local/share/chatfleet``."""
    env = os.environ if environ is None else environ
    if configured:
        return Path(configured).expanduser()
    if env.get(DATA_DIR_ENV):
        return Path(env[DATA_DIR_ENV]).expanduser()
    return Path.home() / ".local" / "share" / "chatfleet"


def load_signing_key(
    config: AuthConfig, folder: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The key from ``config.signing_key_env``; if unset, the local key in the data folder.

    Raises ``ValueError`` for a key shorter than 32 bytes.
    """
    env = os.environ if environ is None else environ
    key = env.get(config.signing_key_env)
    if key:
        if len(key.encode()) < MIN_KEY_BYTES:
            raise ValueError(
                f"{config.signing_key_env} is shorter than {MIN_KEY_BYTES} bytes;"
                " generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        return key
    return local_signing_key(Path(folder) if folder is not None else data_dir(environ=env))


def local_signing_key(folder: Path) -> str:
    """Read ``folder/jwt-signing-key``, creating it (mode 0600) the first time.

    Safe against concurrent first starts: the key is written to a private temp
    file and linked into place, so every process ends up reading the same key.
    """
    path = folder / KEY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                logger.info("generated a JWT signing key in %s", path)
            except FileExistsError:
                pass  # another process won the race; use its key
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); setting 0600", path, mode)
        path.chmod(0o600)
    key = path.read_text().strip()
    if len(key.encode()) < MIN_KEY_BYTES:
        raise ValueError(f"the signing key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return key
