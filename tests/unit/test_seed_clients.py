"""Clients of the four systems chatfleet replaces, written as those clients were.

Each test drives chatfleet the way one earlier system's client did: plain httpx
JSON with exactly the request bodies that system documented (camelCase where it
used it), and a ``websockets`` client that reads exactly the fields its client
read (``frame["token"]``, ``event["data"]["content"]``...). Only authentication
differs: chatfleet asks for a token where the earlier systems did not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fakes.app_server import serving
from tests.fakes.chat_app import ChatApp, RecordingEngine, fake_model
from websockets.asyncio.client import ClientConnection, connect

from chatfleet.serving.api import LocalEngineClient, LocalRouterClient, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig
from chatfleet.serving.protocol import Classification, Compression
from chatfleet.serving.routing import Router
from chatfleet.serving.store import Store


async def next_frame(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 20))
    return frame


def sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs, the way an EventSource-style client splits a stream."""
    out = []
    for block in body.strip().split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        out.append((event, json.loads("\n".join(data))))
    return out


# ---- the chat dashboard PoC: alerts become sessions, followed over WS /ws ------------


@pytest.fixture
async def dashboard(tmp_path: Path) -> AsyncIterator[str]:
    chat = ChatApp(
        Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/poc.db"),
        fake_model("thinker", reply_tokens=40, thinking_tokens=12, tokens_per_second=200),
    )
    async with serving(chat.app) as url:
        yield url


async def test_dashboard_poc_client(dashboard: str) -> None:
    async with (
        httpx.AsyncClient(base_url=dashboard, timeout=30) as http,
        connect(dashboard.replace("http://", "ws://") + "/ws") as ws,
    ):
        hello = await next_frame(ws)
        assert hello["type"] == "connected"
        assert hello["data"]["message"]

        r = await http.post("/api/alerts", json={"message": "Disk almost full on db-1"})
        assert r.status_code < 300, r.text
        session_id = r.json()["session_id"]
        assert r.json()["id"] == session_id

        thinking = response = ""
        closing: dict[str, dict[str, Any]] = {}
        finals = []
        while True:
            event = await next_frame(ws)
            if event["type"] == "ping":
                continue
            assert event["session_id"] == session_id
            data = event["data"]
            if event["type"] == "session.created":
                assert (data["id"], data["message"]) == (session_id, "Disk almost full on db-1")
                assert data["status"] == "pending"
            elif event["type"] == "llm.thinking":
                if data["is_complete"]:
                    closing["thinking"] = data
                else:
                    assert "thinking" not in closing, "thinking streamed after it completed"
                    thinking += data["content"]
            elif event["type"] == "llm.response":
                finals.append(data["is_final"])
                if data["is_final"]:
                    closing["response"] = data
                else:
                    assert data["is_complete"] is False
                    response += data["content"]
            elif event["type"].startswith("session.") and event["type"] != "session.created":
                assert event["type"] == "session.completed"
                assert data["id"] == session_id
                break

        # Pieces while streaming; the closing events carry the whole text.
        assert len(thinking.split()) == 12
        assert len(response.split()) == 40
        assert closing["thinking"]["content"] == thinking
        assert closing["response"]["content"] == response
        assert closing["response"]["is_complete"] is True
        assert len(finals) >= 3
        assert finals == [False] * (len(finals) - 1) + [True]

        listed = (await http.get("/api/sessions")).json()["data"]
        assert [s["id"] for s in listed] == [session_id]
        stored = (await http.get(f"/api/sessions/{session_id}")).json()
        assert (stored["status"], stored["response"]) == ("completed", response)


async def test_alert_with_fields_the_poc_did_not_need_is_still_a_session(dashboard: str) -> None:
    async with httpx.AsyncClient(base_url=dashboard, timeout=30) as http:
        r = await http.post("/api/alerts", json={"message": "CPU hot", "severity": "warning"})
        assert r.status_code == 202, r.text
        assert (await http.get(f"/api/sessions/{r.json()['session_id']}")).status_code == 200
        bad = await http.post("/api/alerts", json={"severity": "warning"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "message"


# ---- the LLM orchestrator: /v1/messages with server-side history ---------------------


async def test_orchestrator_client(tmp_path: Path) -> None:
    chat = ChatApp(
        Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/orchestrator.db"),
        fake_model("fake", reply_tokens=6),
    )
    async with serving(chat.app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.get("/healthz")).status_code == 200

        first = await http.post(
            "/v1/messages",
            json={"conversation_id": "", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert first.status_code == 200, first.text
        conversation_id = first.json()["conversation_id"]
        uuid.UUID(conversation_id)
        assert len(first.json()["reply"].split()) == 6

        again = await http.post(
            "/v1/messages",
            json={
                "conversation_id": conversation_id,
                "messages": [{"role": "user", "content": "and then?"}],
            },
        )
        assert again.status_code == 200, again.text
        assert again.json()["conversation_id"] == conversation_id
        # The history was prepended server-side.
        seen = [m.content for m in chat.engines["fake"].requests[-1].messages]
        assert seen == ["hi", first.json()["reply"], "and then?"]

        # "" once more: a new conversation, not the last one.
        other = await http.post(
            "/v1/messages",
            json={"conversation_id": "", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert other.json()["conversation_id"] != conversation_id
        assert [m.content for m in chat.engines["fake"].requests[-1].messages] == ["hi"]


# ---- the chat gateway: device tokens, then chat over WS /ws/chat ---------------------

SECRET = "gateway-secret"


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, dict[str, RecordingEngine]]]:
    config = AppConfig(
        models=[
            fake_model("fake", reply_tokens=20),
            fake_model("broken", reply_tokens=30, fail_after_tokens=5),
        ],
        auth={
            "clients": [
                {
                    "client_id": "phone-app",
                    "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                }
            ]
        },
        websocket={"ping_interval_s": 0.3, "pong_timeout_s": 5},
    )
    engines = {m.name: RecordingEngine(m) for m in config.models}
    clients = {name: LocalEngineClient(e) for name, e in engines.items()}

    async def start() -> None:
        for client in clients.values():
            await client.start()

    auth = Authenticator(config.auth, "g" * 48, MemoryRevocationStore())
    app = create_app(config, clients, auth=auth, on_startup=start)
    async with serving(app) as url:
        yield url, engines


async def test_gateway_client_tokens_and_health(
    gateway: tuple[str, dict[str, RecordingEngine]],
) -> None:
    url, _ = gateway
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for path in ("/health", "/ready", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        issued = await http.post(
            "/auth/token",
            json={
                "client_id": "phone-app",
                "device_name": "Pixel 8",
                "device_type": "mobile",
                "client_secret": SECRET,
            },
        )
        assert issued.status_code == 200, issued.text
        tokens = issued.json()
        assert tokens["token_type"] == "bearer"
        assert isinstance(tokens["expires_in"], int) and tokens["expires_in"] > 0
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}

        assert (await http.post("/auth/validate", headers=bearer)).status_code == 200
        health = (await http.get("/ws/health", headers=bearer)).json()
        assert health["status"] == "ok"
        assert health["service"]
        assert health["metrics"]["active_connections"] == 0
        assert health["metrics"]["total_connections"] == 0
        assert health["backend"]["status"] == "ok"
        assert (await http.get("/ws/sessions", headers=bearer)).status_code == 200

        refreshed = await http.post(
            "/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 200, refreshed.text
        assert (await http.post("/auth/revoke", headers=bearer)).status_code == 200
        assert (await http.post("/auth/validate", headers=bearer)).status_code == 401
        # Without the secret chatfleet still says no (the earlier gateway did not ask).
        anonymous = await http.post(
            "/auth/token",
            json={"client_id": "phone-app", "device_name": "Pixel 8", "device_type": "mobile"},
        )
        assert anonymous.status_code == 400


async def test_gateway_client_chats_over_ws(
    gateway: tuple[str, dict[str, RecordingEngine]],
) -> None:
    url, engines = gateway
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        tokens = (
            await http.post(
                "/auth/token",
                json={
                    "client_id": "phone-app",
                    "device_name": "Pixel 8",
                    "device_type": "mobile",
                    "client_secret": SECRET,
                },
            )
        ).json()
    ws_url = url.replace("http://", "ws://") + f"/ws/chat?token={tokens['access_token']}"

    async with connect(ws_url) as ws:
        pings = 0

        async def frame() -> dict[str, Any]:
            """The next frame that is not a ping (answered as the gateway's client did)."""
            nonlocal pings
            while True:
                got = await next_frame(ws)
                if got["type"] != "ping":
                    return got
                pings += 1
                assert isinstance(got["timestamp"], (int, float))
                await ws.send(json.dumps({"type": "pong", "timestamp": got["timestamp"]}))

        async def ask(content: str, **fields: Any) -> tuple[str, dict[str, Any]]:
            await ws.send(json.dumps({"type": "chat", "content": content, **fields}))
            text = ""
            while (got := await frame())["type"] == "token":
                if "conversation_id" in fields:
                    assert got["conversation_id"] == fields["conversation_id"]
                text += got["token"]
            return text, got

        ack = await frame()
        assert ack["type"] == "connection_ack"
        assert (ack["client_id"], len(ack["session_id"])) == ("phone-app", 32)

        text, done = await ask(
            "first question",
            conversation_id="conv-a",
            model="fake",
            temperature=0.2,
            max_tokens=7,
        )
        assert done["type"] == "complete", done
        assert done["conversation_id"] == "conv-a"
        assert done["total_tokens"] == 7
        assert done["latency_ms"] >= 0
        assert len(text.split()) == 7
        request = engines["fake"].requests[-1]
        assert (request.temperature, request.max_tokens) == (0.2, 7)

        _, done = await ask("second question", conversation_id="conv-b")
        assert done["conversation_id"] == "conv-b"
        await asyncio.sleep(0.7)  # long enough for the server to ping, and be answered
        _, done = await ask("third question", conversation_id="conv-a")
        assert done["type"] == "complete", done
        seen = [m.content for m in engines["fake"].requests[-1].messages]
        # conv-a went on where it stopped; conv-b's question is not in it.
        assert seen[0] == "first question"
        assert seen[-1] == "third question"
        assert "second question" not in seen

        _, error = await ask("x", conversation_id="conv-c", model="nope")
        assert error["type"] == "error"
        assert "nope" in error["error"]
        assert error["code"] == "model_not_found"
        _, error = await ask("x", conversation_id="conv-c", model="broken")
        assert (error["type"], error["code"]) == ("error", "engine_error")
        assert error["error"]

        assert pings >= 1  # answered, so the connection is still up
        _, done = await ask("still there?")
        assert done["type"] == "complete"
        assert done["conversation_id"] == ack["session_id"]


# ---- the prompt router: select, classify, compress, generate, rankings ---------------

KEYWORDS = {
    "coding": ("python", "code", "function"),
    "maths": ("integral", "equation", "sum", "prime"),
    "translation": ("translate", "french", "german"),
}


class KeywordClassifier:
    """Scores a label by its keyword hits; records the labels it was asked about."""

    def __init__(self, categories: list[str]) -> None:
        self.categories = categories
        self.asked: list[list[str]] = []

    async def __call__(self, prompt: str) -> Classification:
        return await self.classify(prompt, None, None, False)

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification:
        labels = list(labels or self.categories)
        self.asked.append(labels)
        text = prompt.lower()
        hits = [1 + 4 * sum(k in text for k in KEYWORDS.get(label, ())) for label in labels]
        ranked = sorted(
            zip(labels, (h / sum(hits) for h in hits), strict=True), key=lambda p: -p[1]
        )
        return Classification([lab for lab, _ in ranked], [s for _, s in ranked], multi_label)


class FirstWordsCompressor:
    async def __call__(self, context: str, question: str) -> Compression:
        return await self.compress(context, question, None)

    async def compress(self, context: str, question: str, ratio: float | None) -> Compression:
        words = context.split()
        if len(words) < 20:
            return Compression(context, len(words), len(words), skipped=True)
        kept = words[: max(1, int(len(words) * (ratio or 0.5)))]
        return Compression(" ".join(kept), len(words), len(kept))


@dataclass
class PromptRouter:
    http: httpx.AsyncClient
    classifier: KeywordClassifier
    engines: dict[str, RecordingEngine]


@pytest.fixture
async def router() -> AsyncIterator[PromptRouter]:
    config = AppConfig.model_validate(
        {
            "models": [
                fake_model("general", reply_tokens=8),
                fake_model("coder", reply_tokens=8),
                fake_model("mathematician", reply_tokens=8),
            ],
            "classifier": {},
            "auth": {"enabled": False},
            "routing": {
                "routes": [
                    {"category": "coding", "model": "coder"},
                    {"category": "maths", "model": "mathematician"},
                ],
                "default_model": "general",
                "confidence_threshold": 0.6,
            },
        }
    )
    assert config.classifier is not None
    classifier = KeywordClassifier([c.name for c in config.classifier.categories])
    compressor = FirstWordsCompressor()
    recorders = {m.name: RecordingEngine(m) for m in config.models}
    engines = {name: LocalEngineClient(e) for name, e in recorders.items()}
    for engine in engines.values():
        await engine.start()
    app = create_app(
        config,
        engines,
        router=LocalRouterClient(Router(config, classifier, compressor)),
        classifier=classifier,
        compressor=compressor,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router"
    ) as http:
        yield PromptRouter(http, classifier, recorders)


async def test_prompt_router_select_in_camel_case(router: PromptRouter) -> None:
    http, classifier = router.http, router.classifier
    # Unrestricted, maths wins this prompt.
    prompt = "an integral equation sum of primes, in python"
    r = await http.post("/api/models/select", json={"prompt": prompt})
    assert sse(r.text)[0][1]["selected_model"] == "mathematician"

    r = await http.post(
        "/api/models/select",
        json={
            "prompt": prompt,
            "temperature": 0.3,
            "topP": 0.9,
            "maxTokens": 3,
            "possibleCategories": ["coding", "translation"],
            "userId": "u-17",  # the router's clients send more than chatfleet needs
        },
    )
    assert r.status_code == 200, r.text
    events = sse(r.text)
    kind, metadata = events[0]
    assert kind == "metadata"
    assert metadata["selected_model"] == "coder"  # from a category the client allowed
    assert metadata["category"] == "coding"
    assert set(metadata["scores"]) == {"coding", "translation"}
    assert metadata["classification"]["labels"] == ["coding", "translation"]
    assert classifier.asked[-1] == ["coding", "translation"]
    assert {k for k, _ in events[1:-1]} == {"text_chunk"}
    assert len("".join(d["text"] for k, d in events if k == "text_chunk").split()) == 3
    assert events[-1][0] == "end_stream"
    assert events[-1][1]["usage"]["completion_tokens"] == 3  # maxTokens was honoured
    request = router.engines["coder"].requests[-1]
    assert (request.temperature, request.top_p, request.max_tokens) == (0.3, 0.9, 3)

    # The snake_case spelling works the same.
    r = await http.post(
        "/api/models/select",
        json={"prompt": prompt, "possible_categories": ["coding"], "max_tokens": 2, "top_p": 0.5},
    )
    assert r.status_code == 200, r.text
    assert sse(r.text)[0][1]["selected_model"] == "coder"
    assert sse(r.text)[-1][1]["usage"]["completion_tokens"] == 2

    # A weak signal: the confidence floor (0.6) sends it to the default model, unless
    # the client names the categories (here all of them): then the best one's route answers.
    r = await http.post("/api/models/select", json={"prompt": "a python question"})
    assert (sse(r.text)[0][1]["selected_model"], sse(r.text)[0][1]["reason"]) == (
        "general",
        "unclassified",
    )
    r = await http.post(
        "/api/models/select",
        json={
            "prompt": "a python question",
            "possibleCategories": ["translation", "maths", "coding", "summarisation", "chit-chat"],
        },
    )
    assert sse(r.text)[0][1]["selected_model"] == "coder"

    # An empty list is no restriction (the router's clients always send the field).
    r = await http.post(
        "/api/models/select", json={"prompt": prompt, "possibleCategories": [], "topP": 1}
    )
    assert sse(r.text)[0][1]["selected_model"] == "mathematician"
    bad = await http.post(
        "/api/models/select", json={"prompt": prompt, "possibleCategories": ["coding", "coding"]}
    )
    assert bad.status_code == 400


async def test_prompt_router_classify_compress_generate_rankings(router: PromptRouter) -> None:
    http = router.http
    r = await http.post(
        "/api/classify",
        json={
            "prompt": "translate this to german",
            "possible_categories": ["translation", "maths"],
            "multi_label": False,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["category"] == "translation"
    assert sorted(r.json()["labels"]) == ["maths", "translation"]

    r = await http.post("/api/compress", json={"text": " ".join(["word"] * 40), "ratio": 0.25})
    assert r.status_code == 200, r.text
    assert r.json()["compressed_tokens"] == 10

    r = await http.post("/api/generate", json={"prompt": "hello", "model": "coder"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[0] == ("metadata", {"model": "coder", "request_id": events[0][1]["request_id"]})
    assert len("".join(d["text"] for k, d in events if k == "text_chunk").split()) == 8
    assert events[-1][0] == "end_stream"

    rankings = (await http.get("/api/model-rankings")).json()
    by_category = {r["category"]: r["models"] for r in rankings["rankings"]}
    assert by_category["coding"][0] == "coder"
