"""Fixtures of the operator tests: the CRD, samples, schemas, and Kopf against kmock."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from kmock_emulator import StampingEmulator
from operator_helpers import DATA, ROOT, declare_resources, write_kubeconfig

_THIRD_PARTY_WARNINGS = [
    # kmock 0.8 loads its bundled resource list with a legacy importlib.resources call.
    "ignore:read_binary is deprecated:DeprecationWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "service_monitors: the emulator serves the ServiceMonitor CRD"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Warnings that third parties raise and we cannot fix here.
    for item in items:
        if "tests/operator" in str(item.fspath):
            for rule in _THIRD_PARTY_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(rule))


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "crds" / "chatfleet.dev_chatdeployments.yaml").read_text())


@pytest.fixture(scope="session")
def rayservice_schema() -> dict[str, Any]:
    return json.loads((DATA / "kuberay" / "ray.io_rayservices.v1.schema.json").read_text())


@pytest.fixture
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[StampingEmulator]:
    import kmock

    marker = request.node.get_closest_marker("service_monitors")
    async with StampingEmulator() as handler, kmock.Server(handler):
        declare_resources(handler, service_monitors=marker is not None)
        yield handler


@pytest.fixture
def kubeconfig(emulator: StampingEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import kubernetes

    path = tmp_path / "kubeconfig"
    write_kubeconfig(path, str(emulator.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The kubernetes client read $KUBECONFIG once at import; Kopf logs in through it.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


@pytest.fixture
def objects(
    emulator: StampingEmulator,
) -> Iterator[Callable[[str, str, str], dict[str, Any] | None]]:
    def get(resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        import kmock

        res = kmock.resource(resource)
        for (r, ns, n), obj in emulator.objects.items():
            if r == res and ns == namespace and n == name and not obj.deleted:
                return obj.raw  # type: ignore[no-any-return]
        del key
        return None

    return get
