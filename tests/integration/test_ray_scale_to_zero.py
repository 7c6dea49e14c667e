"""Scale-to-zero on real Ray Serve: the waiting client is told, 0 -> 1 -> 2 -> 0 replicas.

Run alone (one Ray per pytest session). Bounds are generous waits, never timings.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from chatfleet.serving.app._admission import running_replicas
from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

APP = "zero"
SCALING = {
    "min_replicas": 0,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 2,
    "downscale_to_zero_delay_s": 2,
    "cold_start_timeout_s": 120,
}


@pytest.fixture(scope="module")
def url(ray_serve: Any) -> str:
    config = AppConfig(
        auth={"enabled": False},
        models=[
            ModelConfig(name="warm", engine="fake", fake={"reply_tokens": 8}),
            ModelConfig(
                name="cold",
                engine="fake",
                fake={"reply_tokens": 400, "tokens_per_second": 40},
                autoscaling=SCALING,
            ),
            # Asks for more CPUs than Ray has: its replica never starts.
            ModelConfig(
                name="never",
                engine="fake",
                num_cpus=64,
                autoscaling={"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 2},
                admission={"max_queue_wait_s": 1, "retry_after_s": 5},
            ),
        ],
    )
    return ray_serve.deploy(config, APP)


def _chat(model: str, stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hello there"}],
    }


def _running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


async def _eventually_running(deployment: str, replicas: int, within_s: float = 180) -> None:
    for _ in range(int(within_s / 0.5)):
        if _running(deployment) == replicas:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{deployment}: {_running(deployment)} replicas, not {replicas}")


async def _sse_lines(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[str]:
    async with http.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        return [line async for line in response.aiter_lines() if line]


async def test_a_cold_model_says_it_is_loading_then_answers(url: str) -> None:
    await _eventually_running("engine-cold", 0)
    async with httpx.AsyncClient(timeout=150) as http:
        lines = await _sse_lines(http, f"{url}/v1/chat/completions", _chat("cold"))
    # The notice comes first, before any token; then the answer streams as usual.
    assert lines[0] == ": loading model cold", lines[:3]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[1:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert lines[-1] == "data: [DONE]"
    assert _running("engine-cold") == 1


async def test_a_load_ramp_adds_a_replica_and_idle_scales_to_zero(url: str, ray_serve: Any) -> None:
    async with httpx.AsyncClient(timeout=150) as http:
        # Four streams of ~10 s each against target_ongoing_requests 1: Serve wants 2.
        ramp = [
            asyncio.create_task(
                _sse_lines(http, f"{url}/v1/chat/completions", _chat("cold", max_tokens=400))
            )
            for _ in range(4)
        ]
        try:
            await _eventually_running("engine-cold", 2, within_s=120)
            # What the ingress reads to tell "loading" from "busy" (a private Ray chain):
            # a handle's router learns both replicas.
            handle = ray_serve.handle("engine-cold", APP).options(stream=True)
            for _ in range(120):
                if running_replicas(handle) == 2:
                    break
                await asyncio.sleep(0.25)
            assert running_replicas(handle) == 2
        finally:
            answers = await asyncio.gather(*ramp)
        assert all(lines[-1] == "data: [DONE]" for lines in answers)
    await _eventually_running("engine-cold", 0)


async def test_openai_client_is_unaffected_by_the_notice(url: str) -> None:
    await _eventually_running("engine-cold", 0)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=150)
    stream = await client.chat.completions.create(
        model="cold", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    await client.close()


async def test_ws_chat_and_generate_send_a_loading_event(url: str) -> None:
    await _eventually_running("engine-cold", 0)
    async with connect(url.replace("http", "ws", 1) + "/ws/chat") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "connection_ack"
        await ws.send(json.dumps({"type": "chat", "content": "hi", "model": "cold"}))
        types: list[str] = []
        while not types or types[-1] not in ("complete", "error"):
            types.append(json.loads(await asyncio.wait_for(ws.recv(), 150))["type"])
    types = [t for t in types if t != "ping"]
    assert types[0] == "loading", types
    assert "token" in types and types[-1] == "complete", types
    await _eventually_running("engine-cold", 0)
    async with httpx.AsyncClient(timeout=150) as http:
        body = {"model": "cold", "prompt": "hi", "max_tokens": 8}
        lines = await _sse_lines(http, f"{url}/api/generate", body)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[:2] == ["loading", "metadata"], events
    assert events[-1] == "end_stream"


async def test_a_warm_model_streams_without_a_notice(url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        lines = await _sse_lines(http, f"{url}/v1/chat/completions", _chat("warm"))
    assert lines[0].startswith("data: "), lines[:2]
    assert not any(line.startswith(":") for line in lines)


async def test_a_model_that_never_starts_is_a_503_with_retry_after(url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        refused = await http.post(f"{url}/v1/chat/completions", json=_chat("never", stream=False))
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        error = refused.json()["error"]
        assert error["code"] == "model_starting"
        assert "never" in error["message"]
        # Streamed: told it is loading, then an error event in OpenAI's stream shape.
        lines = await _sse_lines(http, f"{url}/v1/chat/completions", _chat("never"))
    assert lines[0] == ": loading model never"
    assert json.loads(lines[1].removeprefix("data: "))["error"]["code"] == "model_starting"
    assert lines[-1] == "data: [DONE]"
