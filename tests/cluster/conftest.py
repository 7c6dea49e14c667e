"""The cluster tier: a real control plane (``hack/control-plane.sh``) for the whole session.

etcd, kube-apiserver (RBAC, admission incl. ``OwnerReferencesPermissionEnforcement``),
kube-controller-manager (garbage collection) and the KubeRay operator run on
127.0.0.1; there is no kubelet and no scheduler, so Pods stay Pending. Helm and kubectl
are the real binaries. ``$CHATFLEET_KUBECONFIG`` points the tier at a running plane
instead (e.g. one left up by ``hack/control-plane.sh up`` while iterating).

Without the plane the tier skips on a laptop and fails in CI (tests/fakes/required.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import ROOT, Cluster
from tests.fakes.required import missing

SCRIPT = ROOT / "hack" / "control-plane.sh"


def _bin_dir() -> Path:
    """Where hack/control-plane.sh put kubectl, helm and the rest (its ``env`` says)."""
    env = subprocess.run(
        ["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True
    ).stdout
    for line in env.splitlines():
        if line.startswith("export CHATFLEET_CP_BIN="):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    raise AssertionError(f"hack/control-plane.sh env printed no CHATFLEET_CP_BIN:\n{env}")


def _plane_from_script(state: Path) -> Iterator[Cluster]:
    if not SCRIPT.is_file():
        missing(f"{SCRIPT.relative_to(ROOT)} is missing")
    # Files, not pipes: the daemons `up` starts would hold a pipe open after it exits.
    out, err = state / "up.stdout", state / "up.stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        up = subprocess.run(
            ["bash", str(SCRIPT), "up", str(state)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=3600,  # the first run builds everything from Go modules
            check=False,
        )
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], check=False, timeout=120)
        missing(f"hack/control-plane.sh up failed ({up.returncode}):\n{err.read_text()[-4000:]}")
    kubeconfig = Path(out.read_text().strip().splitlines()[-1])
    try:
        yield Cluster(kubeconfig=kubeconfig, bin_dir=_bin_dir())
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], check=False, timeout=120)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("CHATFLEET_KUBECONFIG")
    if given:
        yield Cluster(kubeconfig=Path(given), bin_dir=_bin_dir())
        return
    yield from _plane_from_script(tmp_path_factory.mktemp("control-plane"))
