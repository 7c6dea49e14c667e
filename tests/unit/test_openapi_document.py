"""The OpenAPI document says what the server really answers (Schemathesis checks it live)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from tests.unit.test_api import fake_model

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.api._openapi import ROUTE_ERRORS, STREAMED
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
CLIENTS = [{"client_id": "app", "secret_sha256": hashlib.sha256(b"s").hexdigest()}]


def document(*models: ModelConfig, auth: bool = True) -> dict[str, Any]:
    config = AppConfig(
        models=list(models) or [fake_model()],
        auth={"clients": CLIENTS} if auth else {"enabled": False},
    )
    # Never started: the document only needs a client per model.
    engines = {m.name: LocalEngineClient(FakeEngine(fake_model(m.name))) for m in config.models}
    authenticator = Authenticator(config.auth, "k" * 48, MemoryRevocationStore()) if auth else None
    app = create_app(config, engines, metrics=Metrics(), auth=authenticator)
    spec: dict[str, Any] = app.openapi()
    return spec


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return document()


def operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }


def test_no_422_anywhere_and_errors_have_openais_shape(spec: dict[str, Any]) -> None:
    for route, op in operations(spec).items():
        assert "422" not in op["responses"], route
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and route != "GET /ready":
                assert response["content"]["application/json"]["schema"] == ERROR, route
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_statuses_where_they_occur(spec: dict[str, Any]) -> None:
    ops = operations(spec)

    def statuses(route: str) -> set[str]:
        return set(ops[route]["responses"])

    assert statuses("POST /v1/chat/completions") == {
        "200", "400", "401", "404", "413", "429", "502", "503"
    }  # fmt: skip
    assert statuses("POST /api/sessions/{session_id}/cancel") >= {"404", "409", "401"}
    assert statuses("GET /v1/conversations") >= {"400", "401", "429", "503"}
    assert "413" not in statuses("GET /v1/conversations")  # no body
    assert statuses("GET /healthz") == {"200"}  # public, no input
    assert statuses("POST /auth/token") == {"200", "400", "401", "413", "429"}  # public
    assert statuses("GET /ready") == {"200", "503"}


def test_streams_and_plain_text_are_documented(spec: dict[str, Any]) -> None:
    ops = operations(spec)

    def media(route: str) -> set[str]:
        return set(ops[route]["responses"]["200"]["content"])

    assert media("POST /v1/chat/completions") == {"application/json", "text/event-stream"}
    assert media("POST /v1/messages") == {"application/json", "text/event-stream"}
    assert media("POST /api/generate") == {"text/event-stream"}
    assert media("POST /api/models/select") == {"text/event-stream"}
    assert media("GET /metrics") == {"text/plain"}


def test_the_route_tables_name_real_routes(spec: dict[str, Any]) -> None:
    assert set(ROUTE_ERRORS) | set(STREAMED) <= set(operations(spec))


def test_the_request_schema_promises_only_what_a_served_model_does(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]
    # The fake engine has tools and structured output.
    assert request["tools"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/ToolBody"}
    assert request["functions"]["anyOf"] == [{"type": "array", "maxItems": 0}, {"type": "null"}]
    assert schemas["JsonSchemaResponseFormat"]["required"] == ["type", "json_schema"]
    assert len(request["response_format"]["anyOf"][0]["oneOf"]) == 3
    assert request["top_k"]["anyOf"] == [{"type": "null"}]
    assert request["n"]["maximum"] == 1
    assert request["max_tokens"]["anyOf"][0]["maximum"] == 4096
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    # Text fields say that NUL is refused.
    assert schemas["GenerateRequest"]["properties"]["system"]["anyOf"][0]["pattern"] == (
        "^[^\\x00]*$"
    )
    # The seed systems' own messages keep their tool role.
    assert "tool" in schemas["ChatMessage"]["properties"]["role"]["enum"]

    with_ollama = document(
        fake_model(),
        ModelConfig(name="local", engine="ollama", ollama={"model": "qwen3:0.6b"}),
    )
    request = with_ollama["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["top_k"]["anyOf"][0]["type"] == "integer"  # some served model takes it

    # transformers alone: no tools, no structured output, no tool messages.
    schemas = document(ModelConfig(name="smollm2", engine="transformers"))["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]
    assert request["tools"]["anyOf"] == [{"type": "array", "maxItems": 0}, {"type": "null"}]
    assert request["response_format"]["anyOf"] == [
        {"$ref": "#/components/schemas/TextFormat"},
        {"type": "null"},
    ]
    assert "tool" not in schemas["OpenAIMessage"]["properties"]["role"]["enum"]


async def test_405_allows_every_method_of_the_path() -> None:
    config = AppConfig(models=[fake_model()], auth={"enabled": False})
    app = create_app(config, {"fake": LocalEngineClient(FakeEngine(config.models[0]))})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cf") as client:
        r = await client.request("OPTIONS", "/v1/conversations/abc")
        assert r.status_code == 405
        assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
        assert r.json()["error"]["code"] == "method_not_allowed"
