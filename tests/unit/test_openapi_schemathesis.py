"""Schemathesis holds the server to its own /openapi.json, on SQLite and on PostgreSQL.

Every operation of the document is called with generated requests (valid ones, and
invalid ones for the negative checks) through the ASGI app, with a valid bearer token
and every built-in check on: no 5xx, every status, content type, header and body as
documented, valid data accepted, invalid data refused, auth not ignored, unsupported
methods answered 405. Bounded: `EXAMPLES` per operation and phase, so a run is a
couple of thousand requests per store.

Not covered here: the WebSockets (/ws, /ws/chat), which OpenAPI cannot describe
(tests/unit/test_ws_chat.py and test_sessions.py drive them).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from tests.unit.test_api import fake_model

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.store import Store

EXAMPLES = 25


def schemathesis_config(token: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            # Through the document's bearer scheme, so the auth checks know which
            # requests carry it (and which leave it out on purpose).
            "auth": {"openapi": {"bearer": {"bearer": token}}},
            "generation": {
                # Unknown query parameters and headers are ignored, as HTTP APIs do (a
                # browser's cache-buster must not fail); OpenAPI cannot forbid them.
                # Unknown body fields: test_openai_params.py (a 400 on the OpenAI API).
                "allow-extra-parameters": False,
            },
        }
    )


SECRET = "s3cret-of-the-app"


CONFIG = AppConfig(
    models=[fake_model("fake", reply_tokens=6)],
    auth={
        "clients": [
            {
                "client_id": "app",
                "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                "scopes": ["chat", "admin"],
            }
        ],
        # Thousands of requests from one client: the bucket would answer most with 429.
        "rate_limit": {"enabled": False},
    },
)


@pytest.fixture
def api(store_url: str) -> Any:
    auth = Authenticator(CONFIG.auth, "k" * 48, MemoryRevocationStore())
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in CONFIG.models}

    async def start_engines() -> None:
        for client in engines.values():
            await client.start()

    app = create_app(
        CONFIG,
        engines,
        metrics=Metrics(),
        auth=auth,
        store=Store.from_url(store_url),
        on_startup=start_engines,
    )
    token = auth.mint("app", ["chat", "admin"]).access_token
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis_config(token))


schema = schemathesis.pytest.from_fixture("api")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # Schemathesis 4.32's from_fixture reads and renames `node._nodeid`, which pytest 9
    # no longer has: give it one (only its reports' test names depend on it).
    request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_the_api_is_what_its_openapi_document_says(case: schemathesis.Case) -> None:
    if _beyond_the_document(case.body):
        # Still no 5xx and every documented shape; only its 400 is not a "rejected
        # valid request" (test_tools.py checks those 400s).
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
    else:
        case.call_and_validate()


def _beyond_the_document(body: Any) -> bool:
    """A body breaking a cross-field rule OpenAPI cannot state: a ``tool_choice`` (but
    "none") needs ``tools``, and the tool it names must be one of them (as OpenAI's)."""
    if not isinstance(body, dict) or body.get("tool_choice") in (None, "none"):
        return False
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    names = {f.get("name") for f in functions if isinstance(f, dict)}
    choice = body["tool_choice"]
    function = choice.get("function") if isinstance(choice, dict) else None
    named = function.get("name") if isinstance(function, dict) else None
    return not names or (named is not None and named not in names)
