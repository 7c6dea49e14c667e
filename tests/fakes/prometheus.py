"""A real Prometheus server for tests: Debian's ``prometheus`` on loopback, in a temp dir.

`PrometheusServer` writes the given configuration, starts ``prometheus`` on a
free 127.0.0.1 port with its TSDB in the temp dir, and answers PromQL through
the HTTP API (`query` returns Prometheus's JSON, errors included, so a test can
show what Prometheus said). `require_binary` finds ``prometheus`` or
``promtool``: a missing one skips the test locally and fails it in CI (``$CI``
set), where ``scripts/test`` installs them with apt-get.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from tests.fakes.ports import free_port
from tests.fakes.required import missing

__all__ = ["PrometheusServer", "require_binary"]

INSTALL_HINT = "apt-get install -y prometheus (Debian's 2.42, with promtool)"


def require_binary(name: str) -> str:
    """The path of ``name``; skips the test without it, or fails it under CI."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed: {INSTALL_HINT}")
    return path


class PrometheusServer:
    """One ``prometheus`` process; `start` it with a config dict, `stop` it when done."""

    def __init__(self, binary: str, config: dict[str, Any]) -> None:
        self.binary = binary
        self.config = config
        self.root = Path(tempfile.mkdtemp(prefix="chatfleet-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = self.root / "prometheus.yml"
        self.log_file = self.root / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, timeout_s: float = 60.0) -> None:
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self._http.get("/-/ready").status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready in {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        self._http.close()
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- the HTTP API ----------------------------------------------------------------

    def query(self, expr: str) -> dict[str, Any]:
        """``GET /api/v1/query``: Prometheus's JSON answer (``status`` error included)."""
        response = self._http.get("/api/v1/query", params={"query": expr})
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {"status": "error", "error": f"HTTP {response.status_code}: {response.text}"}
        return body

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (job, health, lastError, ...)."""
        response = self._http.get("/api/v1/targets", params={"state": "active"})
        response.raise_for_status()
        return response.json()["data"]["activeTargets"]  # type: ignore[no-any-return]

    def wait_targets_up(self, jobs: set[str], timeout_s: float) -> None:
        """Until every target of ``jobs`` has been scraped successfully."""
        deadline = time.monotonic() + timeout_s
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = [t for t in self.targets() if t["labels"].get("job") in jobs]
            seen = {t["labels"]["job"] for t in targets}
            if seen == jobs and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.5)
        states = [(t["labels"].get("job"), t["health"], t.get("lastError")) for t in targets]
        raise TimeoutError(f"targets of {sorted(jobs)} not up in {timeout_s} s: {states}")

    def wait_scraped_after(self, since: float, timeout_s: float = 30.0) -> None:
        """Until every target's last scrape started after ``since`` (a Unix time)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query("min(timestamp(up))").get("data", {}).get("result", [])
            if result and float(result[0]["value"][1]) > since:
                return
            time.sleep(0.2)
        raise TimeoutError(f"no scrape of every target after {since} in {timeout_s} s")
