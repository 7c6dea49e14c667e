"""Admission and autoscaling: per-engine defaults, Ray Serve options, refusals' shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.app._build import engine_options, ingress_max_ongoing_requests
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import ModelBusy
from chatfleet.serving.protocol import Chunk, GenerationRequest

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Hello there"}]}


def vllm(**fields: Any) -> ModelConfig:
    return ModelConfig(name="v", engine="vllm", vllm={"model": "org/m", **fields})


# ---- per-engine defaults ------------------------------------------------------------


def test_each_engine_admits_what_fits_it() -> None:
    assert vllm().admitted_requests() == 256  # vLLM's default max_num_seqs
    assert vllm(engine_args={"max_num_seqs": 48}).admitted_requests() == 48
    transformers = ModelConfig(name="t", engine="transformers", transformers={"max_concurrency": 4})
    assert transformers.admitted_requests() == 6  # what it runs plus a short queue
    assert ModelConfig(name="f", engine="fake").admitted_requests() == 1000
    ollama = ModelConfig(name="o", engine="ollama", ollama={"model": "llama3.2"})
    assert ollama.admitted_requests() == 1000
    remote = ModelConfig(name="r", engine="openai", openai={"base_url": "http://x", "model": "y"})
    assert remote.admitted_requests() == 1000


def test_max_ongoing_requests_overrides_the_engine_default() -> None:
    model = ModelConfig(name="f", engine="fake", max_ongoing_requests=8)
    assert model.admitted_requests() == 8
    assert model.queued_requests() == 8  # a queue as long as one replica admits
    queued = ModelConfig(name="f", engine="fake", admission={"max_queued_requests": 1})
    assert queued.queued_requests() == 1
    with pytest.raises(ValidationError):  # Serve's smallest queue is one request
        ModelConfig(name="f", engine="fake", admission={"max_queued_requests": 0})


# ---- Ray Serve options --------------------------------------------------------------


def test_fixed_replicas_map_to_serve_options() -> None:
    model = ModelConfig(name="f", engine="fake", num_replicas=3, max_ongoing_requests=10)
    options = engine_options(model)
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (10, 10)


def test_autoscaling_maps_to_serve_autoscaling_config() -> None:
    from chatfleet.serving.app import EngineDeployment

    model = ModelConfig(
        name="f",
        engine="fake",
        max_ongoing_requests=20,
        autoscaling={
            "min_replicas": 0,
            "max_replicas": 4,
            "upscale_delay_s": 1,
            "downscale_delay_s": 60,
            "downscale_to_zero_delay_s": 300,
        },
    )
    options = engine_options(model)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 10.0,  # half of what a replica admits
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 60.0,
        "downscale_to_zero_delay_s": 300.0,
        "metrics_interval_s": 1.0,  # at zero replicas, Serve hears of a request in ~2 s
    }
    # Ray's own validation takes them (its AutoscalingConfig, DeploymentConfig).
    deployment: Any = EngineDeployment
    configured = deployment.options(**options)._deployment_config
    assert configured.autoscaling_config.min_replicas == 0
    assert configured.autoscaling_config.max_replicas == 4
    assert configured.autoscaling_config.metrics_interval_s == 1.0
    # A model that never scales to zero keeps Serve's default reports (every 10 s).
    warm = ModelConfig(name="f", engine="fake", autoscaling={"min_replicas": 1})
    assert "metrics_interval_s" not in engine_options(warm)["autoscaling_config"]
    assert configured.max_queued_requests == 20


def test_scaled_to_zero_waits_for_a_cold_start() -> None:
    warm = ModelConfig(name="f", engine="fake", admission={"max_queue_wait_s": 5})
    assert warm.queue_wait_s() == 5
    cold = ModelConfig(
        name="f",
        engine="fake",
        admission={"max_queue_wait_s": 5},
        autoscaling={"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 90},
    )
    assert cold.queue_wait_s() == 90


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "not both"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "must not exceed"),
        (
            {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}},
            "within min and max",
        ),
        ({"autoscaling": {"max_replicas": 0}}, "greater than or equal to 1"),
    ],
)
def test_bad_replica_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(name="f", engine="fake", **fields)


def test_ingress_leaves_room_for_every_socket() -> None:
    config = AppConfig(
        models=[ModelConfig(name="f", engine="fake")],
        ingress={"max_ongoing_requests": 50},
        websocket={"max_connections": 300},
    )
    # HTTP budget + /ws/chat's and /ws's sockets: Serve never queues HTTP behind sockets.
    assert ingress_max_ongoing_requests(config) == 50 + 2 * 300


# ---- refusals through the app -------------------------------------------------------


class _Gated(LocalEngineClient):
    """A fake engine that holds each answer until ``gate`` opens."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        self.waiting += 1
        await self.gate.wait()
        async for batch in super().batches(request):
            yield batch


class _Full(LocalEngineClient):
    """Every replica full: the admission wait ends in ModelBusy."""

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        raise ModelBusy("model fake is at capacity; retry in 7 s", retry_after=7)
        yield []  # an async generator, as the handle client is


def _app(client: LocalEngineClient, **fields: Any) -> tuple[Any, Metrics]:
    config = AppConfig(models=[client.engine.model], auth={"enabled": False}, **fields)
    metrics = Metrics()
    return create_app(config, {"fake": client}, metrics=metrics), metrics


def _http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatfleet")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_full_model_is_a_429_in_openais_shape(stream: bool) -> None:
    model = ModelConfig(name="fake", engine="fake")
    client = _Full(FakeEngine(model))
    await client.start()
    app, _ = _app(client)
    async with _http(app) as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json() == {
        "error": {
            "message": "model fake is at capacity; retry in 7 s",
            "type": "rate_limit_error",
            "param": None,
            "code": "model_busy",
        }
    }


async def test_http_budget_refuses_with_429_and_frees_its_slots() -> None:
    model = ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 3})
    client = _Gated(FakeEngine(model))
    await client.start()
    app, metrics = _app(client, ingress={"max_ongoing_requests": 1})
    async with _http(app) as http:
        held = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
        for _ in range(500):
            if client.waiting:
                break
            await asyncio.sleep(0.01)
        assert client.waiting == 1
        refused = await http.get("/healthz")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_busy"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        client.gate.set()
        assert (await held).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
    assert 'chatfleet_errors_total{code="server_busy"} 1.0' in _exposition(metrics)


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
