"""The store under Ray Serve: the ingress opens it in its lifespan; sessions run in the replica."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def url(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("ray-store")
    config = AppConfig(
        auth={"enabled": False},
        store={"data_dir": str(folder)},
        models=[
            ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 16, "thinking_tokens": 4})
        ],
    )
    return ray_serve.deploy(config, "stored")


def test_conversations_and_sessions_through_ray(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        ready = client.get("/ready").json()
        assert ready["store"] == "ready"
        first = client.post(
            "/v1/messages", json={"messages": [{"role": "user", "content": "Hello"}]}
        )
        assert first.status_code == 200, first.text
        conversation_id = first.json()["conversation_id"]
        second = client.post(
            "/v1/messages",
            json={
                "conversation_id": conversation_id,
                "messages": [{"role": "user", "content": "Again"}],
            },
        )
        assert second.status_code == 200, second.text
        stored = client.get(f"/v1/conversations/{conversation_id}").json()
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2
        assert stored["messages"][1]["thinking"]

        session = client.post("/api/sessions", json={"message": "Background"})
        assert session.status_code == 202, session.text
        session_id = session.json()["id"]
        deadline = time.monotonic() + 30
        while (found := client.get(f"/api/sessions/{session_id}").json())["status"] != "completed":
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
        assert len(found["response"].split()) == 16
        assert client.get("/ws/sessions").json()["scope"] == "replica"
