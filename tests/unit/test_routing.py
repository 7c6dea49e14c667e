"""The router's decisions and the routing endpoints, with stand-in classifiers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from chatfleet.serving.api import LocalEngineClient, LocalRouterClient, Metrics, create_app
from chatfleet.serving.api._routing_schemas import SelectRequest
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import RequestError
from chatfleet.serving.protocol import Classification, Compression, Message
from chatfleet.serving.routing import PreviousRoute, Router

CATEGORIES = ["coding", "maths", "chit-chat", "summarisation", "translation"]
KEYWORDS = {
    "coding": ("python", "code", "function", "bug"),
    "maths": ("integral", "equation", "sum", "prime"),
    "chit-chat": ("hello", "how are you", "weather"),
    "summarisation": ("summarise", "summary", "tl;dr"),
    "translation": ("translate", "french", "german"),
}


class KeywordClassifier:
    """Deterministic stand-in: the share of keyword hits per label."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def scores(self, prompt: str, labels: list[str]) -> list[float]:
        text = prompt.lower()
        hits = [1 + 4 * sum(k in text for k in KEYWORDS.get(label, ())) for label in labels]
        return [h / sum(hits) for h in hits]

    async def __call__(self, prompt: str) -> Classification:
        return await self.classify(prompt, None, None, False)

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification:
        self.calls.append(prompt)
        labels = labels or CATEGORIES
        ranked = sorted(zip(labels, self.scores(prompt, labels), strict=True), key=lambda p: -p[1])
        return Classification([lab for lab, _ in ranked], [s for _, s in ranked], multi_label)


class HalvingCompressor:
    def __init__(self, min_words: int = 20) -> None:
        self.min_words = min_words
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, context: str, question: str) -> Compression:
        return await self.compress(context, question, None)

    async def compress(self, context: str, question: str, ratio: float | None) -> Compression:
        if ratio is not None and not 0 < ratio <= 1:
            raise RequestError("ratio must be in (0, 1]", param="ratio")
        self.calls.append((context, question))
        words = context.split()
        if len(words) < self.min_words:
            return Compression(context, len(words), len(words), skipped=True)
        kept = words[: max(1, int(len(words) * (ratio or 0.5)))]
        text = " ".join(kept) + (f"\n\n{question}" if question else "")
        return Compression(text, len(words), len(kept))


def fake(name: str, **settings: Any) -> ModelConfig:
    return ModelConfig(name=name, engine="fake", fake={"reply_tokens": 8, **settings})


def routed_config(**routing: Any) -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [
                fake("general"),
                fake("coder"),
                fake("mathematician"),
                fake("broken", fail_after_tokens=0),
            ],
            "classifier": {},
            "auth": {"enabled": False},
            "routing": {
                "routes": [
                    {"category": "coding", "model": "coder"},
                    {"category": "maths", "model": "mathematician"},
                    {"category": "translation", "model": "broken", "fallbacks": ["general"]},
                ],
                "confidence_threshold": 0.4,
                "hysteresis_margin": 0.3,
                **routing,
            },
        }
    )


def user(text: str) -> list[Message]:
    return [Message("user", text)]


async def test_routes_by_category() -> None:
    router = Router(routed_config(), KeywordClassifier())
    decision = await router.decide(user("fix the bug in my python function"))
    assert (decision.model, decision.category, decision.reason) == ("coder", "coding", "route")
    assert decision.confidence > 0.4
    assert set(decision.scores) == set(CATEGORIES)


async def test_unclassified_goes_to_default() -> None:
    router = Router(routed_config(), KeywordClassifier())
    decision = await router.decide(user("tell me something"))
    assert (decision.model, decision.category, decision.reason) == (
        "general",
        None,
        "unclassified",
    )
    assert decision.confidence < 0.4
    assert set(decision.scores) == set(CATEGORIES)  # what it was not sure about stays visible


def explained_classifier(nearest: dict[str, list[tuple[str, float]]]) -> Any:
    async def classify(prompt: str) -> Classification:
        return Classification(["coding", "maths"], [0.9, 0.1], nearest=nearest)

    return classify


async def test_explanation_shows_the_nearest_examples() -> None:
    nearest = {
        "coding": [("Écris une fonction Python qui trie une liste", 0.61), ("x" * 200, 0.5)],
        "maths": [("What is 2 + 2?", 0.2)],
    }
    decision = await Router(routed_config(), explained_classifier(nearest)).decide(user("x"))
    assert decision.explain()["nearest"] == [
        {"example": "Écris une fonction Python qui trie une liste", "similarity": 0.61},
        {"example": "x" * 200, "similarity": 0.5},
    ]
    header = decision.header()
    assert header.isascii()  # a valid header value whatever the example's language
    assert json.loads(header)["nearest"] == {
        "example": "Écris une fonction Python qui trie une liste",
        "similarity": 0.61,
    }
    assert "scores" not in json.loads(header)

    unsure = routed_config(confidence_threshold=0.95)
    decision = await Router(unsure, explained_classifier(nearest)).decide(user("x"))
    assert decision.reason == "unclassified"
    assert "nearest" not in decision.explain()  # no category decided it


async def test_unrouted_category_goes_to_default() -> None:
    router = Router(routed_config(), KeywordClassifier())
    decision = await router.decide(user("please summarise this summary for me"))
    assert (decision.category, decision.model, decision.reason) == (
        "summarisation",
        "general",
        "unrouted_category",
    )


async def test_conversation_sticks_unless_new_category_wins_clearly() -> None:
    router = Router(routed_config(), KeywordClassifier())
    previous = PreviousRoute("coder", "coding", 0.8)
    # Mixed prompt: maths leads coding by a small margin -> stay with the coder.
    mixed = await router.decide(user("python code for an integral equation sum"), previous)
    assert (mixed.model, mixed.reason) == ("coder", "sticky")
    assert "mathematician" in mixed.fallbacks
    # Clearly maths -> switch.
    maths = await router.decide(user("integral of this equation, is the sum prime"), previous)
    assert (maths.model, maths.reason) == ("mathematician", "route")


async def test_previous_model_no_longer_declared_is_ignored() -> None:
    router = Router(routed_config(), KeywordClassifier())
    decision = await router.decide(user("hello"), PreviousRoute("gone", "coding", 0.9))
    assert decision.model != "gone"


def test_rankings_list_route_then_fallbacks() -> None:
    router = Router(routed_config(fallbacks=["general"]), KeywordClassifier())
    rankings = {r["category"]: r["models"] for r in router.rankings()["rankings"]}
    assert rankings["coding"] == ["coder", "general"]
    assert rankings["translation"] == ["broken", "general"]
    assert rankings["chit-chat"] == ["general"]


async def test_compression_never_touches_the_question() -> None:
    compressor = HalvingCompressor()
    router = Router(routed_config(), KeywordClassifier(), compressor)
    context = " ".join(f"word{i}" for i in range(100))
    question = "What is the python function called?"
    decision = await router.decide(
        [Message("system", context), Message("user", f"{context}\n\n{question}")]
    )
    assert decision.compression is not None
    assert decision.compression.original_tokens == 200
    assert decision.compression.compressed_tokens == 100
    assert decision.messages[-1].content.endswith(question)
    assert all(q in ("", question) for _, q in compressor.calls)
    short = await router.decide(user("short python question"))
    assert short.compression is None or short.compression.skipped


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"routes": [{"category": "coding", "model": "nobody"}]}, "names model 'nobody'"),
        ({"routes": [{"category": "poetry", "model": "coder"}]}, "category 'poetry'"),
        ({"fallbacks": ["ghost"]}, "routing.fallbacks names model 'ghost'"),
        (
            {
                "routes": [
                    {"category": "coding", "model": "coder"},
                    {"category": "coding", "model": "general"},
                ]
            },
            "routed twice",
        ),
    ],
)
def test_bad_routing_is_rejected_at_load(routing: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate(
            {"models": [fake("general"), fake("coder")], "classifier": {}, "routing": routing}
        )


def test_routing_needs_a_classifier() -> None:
    with pytest.raises(ValidationError, match="routing needs a classifier"):
        AppConfig.model_validate({"models": [fake("general")], "routing": {}})


# ---- endpoints ---------------------------------------------------------------


@pytest.fixture
async def client() -> Any:
    config = routed_config()
    classifier = KeywordClassifier()
    compressor = HalvingCompressor()
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    for e in engines.values():
        await e.start()
    app = create_app(
        config,
        engines,
        router=LocalRouterClient(Router(config, classifier, compressor)),
        classifier=classifier,
        compressor=compressor,
        metrics=Metrics(),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        yield c


def events(body: str) -> list[tuple[str, Any]]:
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


async def test_auto_model_explains_its_route(client: httpx.AsyncClient) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "python code bug"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "coder"
    route = json.loads(r.headers["x-chatfleet-route"])
    assert (route["model"], route["category"], route["reason"]) == ("coder", "coding", "route")
    assert r.json()["chatfleet_route"]["scores"]["coding"] == route["confidence"]

    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    first = json.loads(r.text.split("\n\n")[0].removeprefix("data: "))
    assert first["choices"] == []
    assert first["chatfleet_route"]["model"] == "coder"
    assert "auto" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]


async def test_fallback_when_model_fails_before_first_token(client: httpx.AsyncClient) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "translate to french"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    route = json.loads(r.headers["x-chatfleet-route"])
    assert route["model"] == "general"
    assert route["reason"] == "fallback"
    assert route["failed_models"] == ["broken"]
    metrics = (await client.get("/metrics")).text
    assert (
        'chatfleet_routing_fallbacks_total{from_model="broken",to_model="general"} 1.0' in metrics
    )


async def test_unclassified_prompts_are_counted(client: httpx.AsyncClient) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "tell me something"}]}
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        route = json.loads(r.headers["x-chatfleet-route"])
        assert (route["model"], route["category"], route["reason"]) == (
            "general",
            None,
            "unclassified",
        )
    body["messages"][0]["content"] = "python code bug"
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "chatfleet_routing_unclassified_total 2.0" in metrics
    assert (
        'chatfleet_routing_decisions_total{category="none",model="general",reason="unclassified"}'
        " 2.0" in metrics
    )


async def test_conversation_header_keeps_the_model(client: httpx.AsyncClient) -> None:
    headers = {"x-chatfleet-conversation-id": "c1"}

    async def ask(text: str) -> dict[str, Any]:
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": text}]},
            headers=headers,
        )
        return dict(json.loads(r.headers["x-chatfleet-route"]))

    assert (await ask("python code"))["model"] == "coder"
    assert (await ask("python code for an integral equation sum"))["reason"] == "sticky"


async def test_select_streams_metadata_then_text(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/models/select", json={"prompt": "solve this integral equation"})
    assert r.status_code == 200
    evs = events(r.text)
    assert evs[0][0] == "metadata"
    meta = evs[0][1]
    assert (meta["selected_model"], meta["category"]) == ("mathematician", "maths")
    assert {"confidence", "scores", "reason", "request_id"} <= set(meta)
    assert {e for e, _ in evs[1:-1]} == {"text_chunk"}
    assert evs[-1][0] == "end_stream"


async def test_classify_and_compress_endpoints(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/classify",
        json={"prompt": "translate to german", "possible_categories": ["translation", "maths"]},
    )
    assert r.status_code == 200
    assert r.json()["category"] == "translation"
    assert sum(r.json()["scores"]) == pytest.approx(1)
    text = " ".join(["alpha"] * 40)
    r = await client.post("/api/compress", json={"text": text, "ratio": 0.25})
    assert r.json()["compressed_tokens"] == 10
    assert r.json()["ratio"] == pytest.approx(0.25)
    r = await client.get("/api/model-rankings")
    assert r.json()["default_model"] == "general"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/classify", {"prompt": "  "}, "prompt"),
        ("/api/classify", {"prompt": "x", "possible_categories": []}, "possible_categories"),
        (
            "/api/classify",
            {"prompt": "x", "possible_categories": ["a", "a"]},
            "possible_categories",
        ),
        ("/api/compress", {"text": "x", "ratio": 0}, "ratio"),
        ("/api/compress", {"text": "x", "ratio": 1.5}, "ratio"),
        ("/api/compress", {"text": ""}, "text"),
        ("/api/models/select", {"prompt": ""}, "prompt"),
        ("/api/models/select", {}, None),
        # The prompt router's camelCase spellings are checked as their fields are.
        ("/api/models/select", {"prompt": "x", "topP": {}}, "topP"),
        ("/api/models/select", {"prompt": "x", "top_p": 0.5, "topP": 0.5}, None),
    ],
)
async def test_routing_bad_input_is_400(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_document_declares_the_camel_case_spellings() -> None:
    # Undeclared, they were unknown properties the document allowed and the server refused.
    schema = SelectRequest.model_json_schema()
    for camel, snake in (("topP", "top_p"), ("maxTokens", "max_tokens")):
        assert {**schema["properties"][camel], "title": ""} == {
            **schema["properties"][snake],
            "title": "",
        }
        assert {"not": {"required": [snake, camel]}} in schema["allOf"]


async def test_auto_without_routing_is_a_clear_404() -> None:
    config = AppConfig.for_engine("fake", auth={"enabled": False})
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    app = create_app(config, engines)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404
        assert "routing" in r.json()["error"]["message"]
        r = await c.post("/api/classify", json={"prompt": "x"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_configured"
