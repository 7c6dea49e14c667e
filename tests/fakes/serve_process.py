"""``chatfleet serve`` as a user runs it, for the e2e tests: a real process with its own
Ray, in a process group of its own so that a test can signal or kill the whole tree.

Each test module only says what differs (its arguments and environment); the port,
the data folder, the log file and the clean-up are the same for all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tests.fakes.ports import free_port

CHATFLEET = [sys.executable, "-m", "chatfleet.serving.cli"]


class ServeProcess:
    """One ``chatfleet serve`` run: its process, its log (stdout and stderr), its URL."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path, port: int) -> None:
        self.env = dict(env)
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [*CHATFLEET, "serve", "--port", str(port), *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 300) -> str:
        """The output once it shows ``text``, the process ended or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if text in self.output:
                break
            time.sleep(0.5)
        return self.output

    def wait_ready(self, timeout_s: float = 300) -> str:
        """Wait for "serving on <url>"; fail with the output if it exited or never came."""
        output = self.wait_for("serving on", timeout_s)
        assert self.proc.poll() is None, f"chatfleet serve exited:\n{output}"
        assert f"serving on {self.url}" in output, f"chatfleet serve not ready:\n{output}"
        return output

    def stop(self, timeout_s: float = 60) -> None:
        """Ctrl-C to the whole group, as a terminal sends it; SIGKILL if it outlasts."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole group (Ray's daemons and workers share it)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def serve_processes(
    folder: Path, env: Mapping[str, str] | None = None
) -> Iterator[Callable[..., ServeProcess]]:
    """A ``start(*args, extra_env=...)`` that runs ``chatfleet serve --port <free> *args``.

    Ray starts fresh (no ``RAY_ADDRESS``) and the data folder (the local signing key,
    a SQLite store) is ``folder``. ``env`` is added for every run, ``extra_env`` for
    one. Whatever is still running at the end is killed.
    """
    started: list[ServeProcess] = []

    def start(*args: str, extra_env: Mapping[str, str] | None = None) -> ServeProcess:
        port = free_port()
        run_env = {
            **os.environ,
            "RAY_ADDRESS": "",
            "CHATFLEET_DATA_DIR": str(folder),
            **(env or {}),
            **(extra_env or {}),
        }
        started.append(ServeProcess(list(args), run_env, folder / f"serve-{port}.log", port))
        return started[-1]

    try:
        yield start
    finally:
        for run in started:
            run.kill()
