"""Budgets through real Ray Serve with two ingress replicas sharing one store.

Serve spreads requests over the replicas; a budget counted per replica would let
through up to twice the limit. Counted in the store, it holds exactly.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

SECRET = "budget-client-secret"
LIMIT = 4


@pytest.fixture(scope="module")
def url(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("ray-budgets")
    config = AppConfig(
        store={"data_dir": str(folder)},  # one SQLite file, shared by both replicas
        ingress={"num_replicas": 2},
        auth={
            "clients": [
                {
                    "client_id": "team",
                    "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                    "budget": {"requests_per_minute": LIMIT},
                }
            ]
        },
        models=[ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 8})],
    )
    return str(ray_serve.deploy(config, "budgets"))


def test_a_budget_holds_across_two_ingress_replicas(url: str, ray_serve: Any) -> None:
    from ray import serve

    replicas = serve.status().applications["budgets"].deployments["ingress"].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    with httpx.Client(base_url=url, timeout=60) as client:
        token = client.post("/auth/token", json={"client_id": "team", "client_secret": SECRET})
        assert token.status_code == 200, token.text
        bearer = {"Authorization": f"Bearer {token.json()['access_token']}"}
        # All within one UTC minute (the next minute is a new budget): start early in one.
        if time.time() % 60 > 30:
            time.sleep(61 - time.time() % 60)
        codes = [
            client.post(
                "/v1/chat/completions",
                headers=bearer,
                json={"model": "fake", "messages": [{"role": "user", "content": f"q{i}"}]},
            ).status_code
            for i in range(3 * LIMIT)
        ]
        assert codes.count(200) == LIMIT, codes
        assert codes.count(429) == 2 * LIMIT, codes
        refused = client.post(
            "/v1/chat/completions",
            headers=bearer,
            json={"model": "fake", "messages": [{"role": "user", "content": "again"}]},
        )
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        # Usage was counted once per answered request, whichever replica answered.
        deadline = time.monotonic() + 30
        while (usage := client.get("/api/usage", headers=bearer).json())["totals"][
            "requests"
        ] < LIMIT:
            assert time.monotonic() < deadline, usage
            time.sleep(0.2)
        assert usage["totals"]["requests"] == LIMIT
        assert usage["totals"]["completion_tokens"] == 8 * LIMIT
