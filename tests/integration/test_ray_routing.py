"""Routing on real Ray Serve: the real MiniLM classifier behind @serve.batch."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from chatfleet.serving.config import AppConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "routing"


@pytest.fixture(scope="module")
def url(ray_serve: Any) -> str:
    fake = {"reply_tokens": 12}
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": "general", "engine": "fake", "fake": fake},
                {"name": "coder", "engine": "fake", "fake": fake},
                {"name": "mathematician", "engine": "fake", "fake": fake},
                {"name": "flaky", "engine": "fake", "fake": {"fail_after_tokens": 0}},
            ],
            "classifier": {"backend": "embedding", "max_batch_size": 16},
            "routing": {
                "routes": [
                    {"category": "coding", "model": "coder"},
                    {"category": "maths", "model": "mathematician"},
                    {"category": "translation", "model": "flaky", "fallbacks": ["general"]},
                ],
                "confidence_threshold": 0.3,
            },
            "auth": {"enabled": False},
        }
    )
    return str(ray_serve.deploy(config, APP))


def sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_select_streams_metadata_then_text_then_end(url: str) -> None:
    r = httpx.post(
        f"{url}/api/models/select",
        json={"prompt": "Write a Python function that reverses a linked list."},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    events = sse(r.text)
    names = [e for e, _ in events]
    assert names[0] == "metadata"
    assert names[-1] == "end_stream"
    assert set(names[1:-1]) == {"text_chunk"}
    meta = events[0][1]
    assert meta["selected_model"] == "coder"
    assert meta["category"] == "coding"
    assert meta["confidence"] >= 0.3
    assert json.loads(r.headers["x-chatfleet-route"])["model"] == "coder"


def test_auto_model_with_openai_client_and_fallback(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the integral of x squared?"}]
    )
    assert json.loads(raw.headers["x-chatfleet-route"])["model"] == "mathematician"
    assert raw.parse().model == "mathematician"
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Translate 'good morning' into French."}],
    )
    route = json.loads(raw.headers["x-chatfleet-route"])
    assert (route["model"], route["failed_models"]) == ("general", ["flaky"])


async def test_classify_endpoint_batches_concurrent_prompts(url: str) -> None:
    prompts = [
        ("Fix this bug in my JavaScript code", "coding"),
        ("Solve 3x + 5 = 20 for x", "maths"),
        ("Hey, how is your day going?", "chit-chat"),
        ("Summarise this report in two sentences", "summarisation"),
        ("Translate this paragraph into German", "translation"),
    ] * 4
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(
            *(client.post(f"{url}/api/classify", json={"prompt": p}) for p, _ in prompts)
        )
        got = [r.json()["category"] for r in responses]
        assert got == [label for _, label in prompts]
        custom = await client.post(
            f"{url}/api/classify",
            json={"prompt": "I love pizza", "possible_categories": ["food", "sport"]},
        )
        assert custom.json()["category"] == "food"
        bad = await client.post(f"{url}/api/classify", json={"prompt": ""})
        assert bad.status_code == 400
        rankings = await client.get(f"{url}/api/model-rankings")
        assert rankings.json()["default_model"] == "general"


def test_embeddings_come_from_the_classifiers_replicas(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    texts = ["How do I sort a list in Python?", "Sorting a Python list", "I love sunny days"]
    result = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    a, b, c = (item.embedding for item in sorted(result.data, key=lambda d: d.index))
    assert len(a) == 384

    def dot(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert dot(a, b) > dot(a, c) + 0.2
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
