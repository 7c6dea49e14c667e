"""Admission on real Ray Serve: a full model refuses fast, sockets never starve HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

APP = "admission"
#: More sockets than the ingress's HTTP budget: before sockets had their own limit,
#: Serve counted them against it and HTTP queued behind them.
SOCKETS = 24
HTTP_BUDGET = 4


@pytest.fixture(scope="module")
def url(ray_serve: Any) -> str:
    config = AppConfig(
        auth={"enabled": False},
        models=[
            ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 8}),
            # One request at a time, one more may wait a second: then 429.
            ModelConfig(
                name="busy",
                engine="fake",
                fake={"reply_tokens": 5000, "tokens_per_second": 50},
                max_ongoing_requests=1,
                admission={"max_queued_requests": 1, "max_queue_wait_s": 1, "retry_after_s": 3},
            ),
            # Scaled to zero when idle; a request starts a replica and waits for it.
            ModelConfig(
                name="cold",
                engine="fake",
                fake={"reply_tokens": 8},
                autoscaling={
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 1,
                    "cold_start_timeout_s": 120,
                },
            ),
        ],
        ingress={"max_ongoing_requests": HTTP_BUDGET},
        websocket={"max_connections": SOCKETS, "ping_interval_s": 2, "pong_timeout_s": 30},
    )
    return ray_serve.deploy(config, APP)


def _chat(model: str, stream: bool = True, max_tokens: int = 64) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hello there"}],
    }


async def _hold(http: httpx.AsyncClient, url: str, first: asyncio.Event) -> None:
    """Stream an answer of model busy, to the end (breaking out would close it)."""
    async with http.stream(
        "POST", f"{url}/v1/chat/completions", json=_chat("busy", max_tokens=4000)
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content"' in line:
                first.set()


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


async def test_a_full_model_refuses_with_429_instead_of_queueing(url: str) -> None:
    # Without the bound the second request would wait the first's 100 s of tokens.
    async with httpx.AsyncClient(timeout=30) as http:
        first = asyncio.Event()
        holder = asyncio.create_task(_hold(http, url, first))
        await asyncio.wait_for(first.wait(), 30)
        for stream in (True, False):
            refused = await http.post(f"{url}/v1/chat/completions", json=_chat("busy", stream))
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "3"
            error = refused.json()["error"]
            assert (error["code"], error["type"]) == ("model_busy", "rate_limit_error")
            assert "busy" in error["message"]
        # One may wait (max_queued_requests 1); the others are refused at once.
        crowd = await asyncio.gather(
            *(
                http.post(f"{url}/v1/chat/completions", json=_chat("busy", stream=False))
                for _ in range(3)
            )
        )
        assert [r.status_code for r in crowd] == [429] * 3
        assert {r.json()["error"]["code"] for r in crowd} == {"model_busy"}
        # Other models are not held up by a full one.
        ok = await http.post(f"{url}/v1/chat/completions", json=_chat("fake", stream=False))
        assert ok.status_code == 200
        text = (await http.get(f"{url}/metrics")).text
        assert (
            _metric(text, "chatfleet_rejected_requests_total", model="busy", reason="wait_timeout")
            >= 2
        )
        assert (
            _metric(text, "chatfleet_rejected_requests_total", model="busy", reason="queue_full")
            >= 1
        )
        assert _metric(text, "chatfleet_errors_total", code="model_busy") == 5
        assert not holder.done()  # the replica was full all along
        holder.cancel()


async def _open_socket(url: str, stack: contextlib.AsyncExitStack) -> ClientConnection:
    ws = await stack.enter_async_context(connect(url.replace("http", "ws", 1) + "/ws/chat"))
    ack = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert ack["type"] == "connection_ack", ack
    return ws


async def test_open_sockets_do_not_starve_http(url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await _open_socket(url, stack) for _ in range(SOCKETS)]
        async with httpx.AsyncClient(timeout=30) as http:
            health = await http.get(f"{url}/healthz")
            assert health.status_code == 200
            answers = await asyncio.gather(
                *(
                    http.post(f"{url}/v1/chat/completions", json=_chat("fake", stream=False))
                    for _ in range(HTTP_BUDGET)
                )
            )
            assert [a.status_code for a in answers] == [200] * HTTP_BUDGET
            ws_health = (await http.get(f"{url}/ws/health")).json()
            assert ws_health["connections"] == SOCKETS
        # One more socket than the socket limit: a clear refusal, not a hang.
        extra = await stack.enter_async_context(connect(url.replace("http", "ws", 1) + "/ws/chat"))
        frame = json.loads(await asyncio.wait_for(extra.recv(), 30))
        assert frame["type"] == "error"
        assert "too many connections" in frame["error"]
        # The sockets held are still alive and answer a chat.
        await sockets[0].send(json.dumps({"type": "chat", "content": "hi", "model": "fake"}))
        while (frame := json.loads(await asyncio.wait_for(sockets[0].recv(), 30)))["type"] in (
            "token",
            "ping",
            "metadata",
        ):
            pass
        assert frame["type"] == "complete", frame


def _running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


async def _eventually_running(deployment: str, replicas: int, within_s: float = 120) -> None:
    for _ in range(int(within_s / 0.5)):
        if _running(deployment) == replicas:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{deployment}: {_running(deployment)} replicas, not {replicas}")


async def test_a_scaled_to_zero_model_starts_on_demand_and_scales_back(url: str) -> None:
    await _eventually_running("engine-cold", 0)
    async with httpx.AsyncClient(timeout=150) as http:
        # Readiness does not wake an idle model: it is ready on demand.
        ready = await http.get(f"{url}/ready")
        assert ready.json()["models"]["cold"] == "ready"
        assert _running("engine-cold") == 0
        answer = await http.post(f"{url}/v1/chat/completions", json=_chat("cold", stream=False))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert _running("engine-cold") == 1
    await _eventually_running("engine-cold", 0)
