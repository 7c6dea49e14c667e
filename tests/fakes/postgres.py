"""A real PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temp dir, on a free port.

`PostgresCluster.start()` returns ``None`` when the PostgreSQL binaries are
missing (the caller skips with `MISSING_REASON`). Each test gets its own
database (`new_database`), so tests never see each other's rows. The server
listens on 127.0.0.1 and on a Unix socket inside the temp dir (never the
system's /var/run/postgresql). ``initdb`` refuses to run as root: as root the
cluster runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.fakes.ports import free_port

__all__ = ["MISSING_REASON", "PostgresCluster", "find_bin_dir", "postgres_cluster"]

MISSING_REASON = (
    "PostgreSQL 15 binaries (initdb, pg_ctl) not found; install them with"
    " `apt-get install -y postgresql`"
)
_USER = "chatfleet"


def find_bin_dir() -> Path | None:
    candidates = [Path(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.insert(0, Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


class PostgresCluster:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="chatfleet-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_user, *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            _USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{_USER}@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        import asyncpg

        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=_USER, database="postgres"
        )
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text() if path.exists() else ""


def postgres_cluster() -> Iterator[PostgresCluster | None]:
    """Body of a session fixture: a started cluster (``None`` without binaries), then stop."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        yield None
        return
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
