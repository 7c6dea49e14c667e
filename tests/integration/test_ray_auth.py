"""Auth and /ws/chat through Ray Serve: the ingress builds its Authenticator from the config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

SECRET = "ray-client-secret"


@pytest.fixture(scope="module")
def url(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("ray-auth")
    config = AppConfig(
        # No signing key in the environment: the replica makes the local key file here.
        store={"data_dir": str(folder)},
        auth={
            "clients": [
                {"client_id": "app", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest()}
            ]
        },
        models=[ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 12})],
    )
    return str(ray_serve.deploy(config, "authed"))


def test_tokens_enforcement_and_ws_chat_through_ray(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # public under the route prefix
        denied = client.get("/v1/models")
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
        r = client.post("/auth/token", data={"client_id": "app", "client_secret": SECRET})
        assert r.status_code == 200, r.text
        tokens = r.json()
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert client.get("/v1/models", headers=bearer).status_code == 200

        ws_url = url.replace("http://", "ws://") + "/ws/chat"
        with connect(f"{ws_url}?token={tokens['access_token']}") as ws:
            ack = json.loads(ws.recv(timeout=30))
            assert ack["type"] == "connection_ack"
            assert ack["client_id"] == "app"
            ws.send(json.dumps({"type": "chat", "content": "Hello"}))
            frames = []
            while (frame := json.loads(ws.recv(timeout=30)))["type"] == "token":
                frames.append(frame)
            assert frame["type"] == "complete", frame
            assert frame["total_tokens"] == 12
            assert len("".join(f["content"] for f in frames).split()) == 12

        with connect(f"{ws_url}?token=forged") as ws:
            assert json.loads(ws.recv(timeout=30))["code"] == "invalid_token"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008

        assert client.post("/auth/revoke", headers=bearer).status_code == 200
        assert client.get("/v1/models", headers=bearer).status_code == 401
