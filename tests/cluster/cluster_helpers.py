"""The cluster tier's helpers: one control plane's kubectl and helm, and polling."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class KubectlError(Exception):
    def __init__(self, args: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"{' '.join(args)} -> {result.returncode}: {result.stderr.strip()}")
        self.stderr = result.stderr
        self.stdout = result.stdout


@dataclass(frozen=True)
class Cluster:
    """One control plane: its admin kubeconfig and the kubectl/helm it was built with."""

    kubeconfig: Path
    bin_dir: Path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
            # Helm keeps its caches and repository files here, never in ~/.
            "HELM_CACHE_HOME": str(self.kubeconfig.parent / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.kubeconfig.parent / "helm-config"),
            "HELM_DATA_HOME": str(self.kubeconfig.parent / "helm-data"),
        }

    def run(
        self,
        tool: str,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / tool), *args]
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(kubeconfig),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(argv, result)
        return result

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    def apply(self, obj: dict[str, Any], *extra: str, **kwargs: Any) -> str:
        return self.kubectl("apply", "-f", "-", *extra, stdin=yaml.safe_dump(obj), **kwargs).stdout

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = ["-n", namespace] if namespace else []
        result = self.kubectl("get", kind, name, *ns, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise KubectlError(["kubectl", "get", kind, name], result)
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def items(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"]
        args += ["-n", namespace] if namespace else ["-A"]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)["items"]  # type: ignore[no-any-return]


def eventually(
    probe: Callable[[], T | None], what: str, timeout: float = 60, every: float = 0.5
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (KubectlError, AssertionError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")
        time.sleep(every)
