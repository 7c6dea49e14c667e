"""The open-files limit `chatfleet serve` raises before Ray starts, and the sockets it
lets HAProxy and the ingress hold. Limits are changed in child processes only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatfleet.serving._file_limit import (
    capacity_warning,
    files_needed,
    haproxy_connections,
    socket_capacity,
)
from chatfleet.serving.config import AppConfig

#: A child that starts under the given limits, may drop root, then raises its limit as
#: `chatfleet serve` does and reports what it got (and what its own children inherit).
_CHILD = """
import json, os, resource, subprocess, sys
from chatfleet.serving._file_limit import capacity_warning, files_needed, raise_file_limit
from chatfleet.serving.config import AppConfig

soft, hard, unprivileged = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if unprivileged and os.geteuid() == 0:
    os.setuid(65534)  # root may raise its hard limit; nobody may not
config = AppConfig()
limit = raise_file_limit(files_needed(config))
inherited = subprocess.run(
    ["/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"], capture_output=True, text=True, check=True
).stdout.split()
print(json.dumps({
    "limit": [limit.soft, limit.hard, limit.wanted, limit.refused],
    "now": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "inherited": [int(n) for n in inherited],
    "warning": capacity_warning(config, limit),
}))
"""


def _raise_in_child(soft: int, hard: int, *, unprivileged: bool = False) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([soft, hard, unprivileged])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_defaults_need_more_files_than_a_common_hard_limit() -> None:
    config = AppConfig()
    # 10,000 sockets and the 1,000 HTTP requests through HAProxy: 2.5 files each.
    assert haproxy_connections(files_needed(config)) >= 11_000
    assert socket_capacity(config, files_needed(config)) == 10_000
    # This machine's former limit (20,000) held ~7,900 connections through HAProxy.
    assert socket_capacity(config, 20_000) < 7_000


def _may_raise_hard_limits() -> bool:
    """Root alone is not enough: containers often drop CAP_SYS_RESOURCE (bit 24)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def test_the_soft_limit_rises_to_the_hard_one_for_the_children() -> None:
    # Ray raises only its driver's own soft limit, to at most 65,536; HAProxy and the
    # replicas are its children's children, started before any of them could.
    got = _raise_in_child(1_024, 4_096)
    assert got["now"] == [4_096, 4_096]
    assert got["inherited"] == [4_096, 4_096]  # what Ray and HAProxy would start with


@pytest.mark.skipif(
    not _may_raise_hard_limits(), reason="needs CAP_SYS_RESOURCE to raise a hard limit"
)
def test_a_privileged_start_raises_both_limits_for_its_children() -> None:
    wanted = files_needed(AppConfig())
    got = _raise_in_child(1_024, 4_096)
    soft, hard, _, refused = got["limit"]
    assert soft == hard == wanted
    assert refused is None
    assert got["now"] == [wanted, wanted]
    assert got["inherited"] == [wanted, wanted]
    assert got["warning"] is None


def test_an_unprivileged_start_keeps_what_it_may_and_says_what_caps_sockets() -> None:
    wanted = files_needed(AppConfig())
    got = _raise_in_child(1_024, 20_000, unprivileged=True)
    assert got["now"] == [20_000, 20_000]  # the soft limit still rose to the hard one
    assert got["limit"][3]  # why the hard one did not
    warning = got["warning"]
    capacity = socket_capacity(AppConfig(), 20_000)
    assert f"caps WebSockets at {capacity} per ingress replica" in warning
    assert f"ulimit -n {wanted}" in warning
    assert capacity_warning(AppConfig(), _limit(wanted)) is None


def _limit(files: int) -> Any:
    from chatfleet.serving._file_limit import FileLimit

    return FileLimit(soft=files, hard=files, wanted=files)
