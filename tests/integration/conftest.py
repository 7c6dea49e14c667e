"""One real Ray Serve instance per test session (cold start ≈ 20 s, 1.5 GB)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.fakes.ray_serve import private_ray_serve

from chatfleet.serving.config import AppConfig


class RayServe:
    """Deploys chatfleet applications on the session's Serve instance."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._apps: dict[str, str] = {}

    def deploy(self, config: AppConfig, name: str) -> str:
        """Deploy ``config`` as application ``name`` under ``/name``; returns its URL."""
        from ray import serve

        from chatfleet.serving.app import build_app

        if "num_replicas" not in config.ingress.model_fields_set:
            # One ingress replica unless a test asks for more (the default is two): most
            # checks read one replica's /metrics and stats, and each replica costs the
            # box memory and start-up time. Tests of several: test_ray_replicas.py,
            # test_ray_budgets.py.
            config = config.model_copy(
                update={"ingress": config.ingress.model_copy(update={"num_replicas": 1})}
            )
        if name not in self._apps:
            # One application at a time: a module's app is done when the next
            # module deploys, and stale replicas would hold CPUs the next needs.
            for stale in list(self._apps):
                serve.delete(stale)
                del self._apps[stale]
            serve.run(build_app(config), name=name, route_prefix=f"/{name}")
            self._apps[name] = f"{self.base_url}/{name}"
        return self._apps[name]

    def handle(self, deployment: str, app: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=app)


@pytest.fixture(scope="session")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    pytest.importorskip("ray")
    # Each module deletes the previous module's app: private_ray_serve keeps Serve from
    # holding a deleted ingress replica 30 s.
    with private_ray_serve(tmp_path_factory.mktemp("ray-data")) as port:
        yield RayServe(port)
