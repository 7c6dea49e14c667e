"""POST /v1/embeddings on the embedded all-MiniLM-L6-v2, through the official openai client
and a real uvicorn server."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.app_server import serving
from tests.fakes.chat_app import fake_model

from chatfleet.serving.api import LocalEmbeddingsClient, LocalEngineClient, create_app
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.routing.classifier import EmbeddingClassifier

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def encoder() -> EmbeddingClassifier:
    classifier = EmbeddingClassifier(AppConfig(classifier={}).classifier)  # type: ignore[arg-type]
    classifier.load()
    return classifier


def _app(encoder: EmbeddingClassifier | None, **config: Any) -> Any:
    app_config = AppConfig(models=[fake_model()], auth={"enabled": False}, **config)
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in app_config.models}

    async def start() -> None:
        for engine in engines.values():
            await engine.start()

    embeddings = None if encoder is None else LocalEmbeddingsClient(encoder)
    return create_app(app_config, engines, embeddings=embeddings, on_startup=start)


@pytest.fixture
async def url(encoder: EmbeddingClassifier) -> AsyncIterator[str]:
    async with serving(_app(encoder, classifier={})) as base:
        yield base


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_the_embeddings_model_is_listed_as_one(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        models = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
    capabilities = models[MODEL]["capabilities"]
    assert (capabilities["embeddings"], capabilities["chat"], capabilities["tools"]) == (
        True,
        False,
        False,
    )
    assert models["fake"]["capabilities"]["chat"] is True
    assert models["fake"]["capabilities"]["embeddings"] is False


async def test_three_texts_embed_in_order_and_similar_ones_are_closer(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    texts = [
        "The cat sat on the mat.",
        "A kitten is sitting on a rug.",
        "Quarterly revenue grew by twelve percent.",
    ]
    # The official client asks for base64 and decodes it: that path is the one it uses.
    result = await client.embeddings.create(model=MODEL, input=texts)
    vectors = [item.embedding for item in sorted(result.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [384, 384, 384]
    for vector in vectors:
        assert math.isclose(math.sqrt(cosine(vector, vector)), 1.0, rel_tol=1e-3)
    cat_kitten, cat_revenue = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert cat_kitten > cat_revenue + 0.2, (cat_kitten, cat_revenue)
    assert cat_kitten > cosine(vectors[1], vectors[2])
    assert result.model == MODEL
    assert result.usage.prompt_tokens > len(texts)  # the model's own token count

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        floats = (
            await http.post("/v1/embeddings", json={"model": MODEL, "input": texts[0]})
        ).json()
        packed = (
            await http.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": texts[0], "encoding_format": "base64"},
            )
        ).json()
    as_floats = floats["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(packed["data"][0]["embedding"]))
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(as_floats, decoded, strict=True))
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(as_floats, vectors[0], strict=True))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model_not_found"),
        ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "invalid_request_error"),
        ({"model": MODEL, "input": []}, 400, "invalid_request_error"),
        ({"model": MODEL, "input": [[1, 2, 3]]}, 400, "invalid_request_error"),
        ({"model": MODEL, "input": "x", "truncate": True}, 400, "invalid_request_error"),
        ({"model": MODEL, "input": "a\u0000b"}, 400, "invalid_request_error"),
    ],
)
async def test_refusals_are_4xx_in_openais_shape(
    url: str, body: dict[str, Any], status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_a_server_without_an_encoder_says_so() -> None:
    async with serving(_app(None)) as base, httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_configured"


@pytest.mark.parametrize("tokens", [[15339, 1917], [[15339, 1917], [9906]]])
async def test_token_arrays_are_refused_in_one_sentence_naming_input(
    url: str, tokens: list[Any]
) -> None:
    # What LangChain's OpenAIEmbeddings sends by default (tiktoken's ids): the 400 says
    # what to do, not how each member of the input union failed.
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model=MODEL, input=tokens)
    assert refused.value.param == "input"
    assert "token arrays are not accepted: send the texts" in refused.value.message
