"""One real Ray Serve instance per test session (cold start ≈ 20 s, 1.5 GB)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from tests.fakes.ports import free_port

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
    ray = pytest.importorskip("ray")
    from ray import serve

    from chatfleet.serving.cli import serve_environment

    # The Serve settings `chatfleet serve` runs with (throughput mode, HAProxy in front
    # of the ingress), for Ray's daemons and workers only: they inherit this process's
    # environment at ray.init, and later `chatfleet serve` subprocesses must not.
    env, _ = serve_environment(os.environ)
    # Each module deletes the previous module's app; in direct-ingress mode Serve keeps a
    # deleted ingress replica 30 s for load balancers to notice. Nothing here needs that.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    saved = dict(os.environ)
    os.environ.update(env)
    ray.init(
        # Logical CPUs: replicas ask for fractions, and a module's app plus the
        # Serve controller and proxy must fit whatever the physical count.
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # Replicas keep their SQLite store and JWT key here, not in ~.
                "CHATFLEET_DATA_DIR": str(tmp_path_factory.mktemp("ray-data")),
            }
        },
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield RayServe(port)
    finally:
        serve.shutdown()
        ray.shutdown()
