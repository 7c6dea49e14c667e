"""Tenancy through the API: two clients never see, change or delete each other's data;
an admin sees and manages everything. A real uvicorn server with auth on, over the
store on SQLite and on PostgreSQL (no mock of the store)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import fake_model
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.store import Store

KEY = "k" * 48
SECRETS = {n: f"{n}-secret" for n in ("alice", "bob", "ops", "carol", "dave")}
BUDGETS = {"carol": {"requests_per_minute": 3}, "dave": {"tokens_per_day": 5}}
CLIENTS = [
    {
        "client_id": name,
        "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "scopes": ["chat", "admin"] if name == "ops" else ["chat"],
        "budget": BUDGETS.get(name),
    }
    for name, secret in SECRETS.items()
]


class Tenants:
    """Two ingress replicas (``url``, ``other_url``) over one store."""

    def __init__(
        self, urls: list[str], tokens: dict[str, str], config: AppConfig, store: Store
    ) -> None:
        self.url, self.other_url = urls
        self.tokens = tokens
        self.config = config
        self.store = store

    def http(self, who: str, *, other: bool = False) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.other_url if other else self.url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=30,
        )

    def ws(self, who: str, path: str = "/ws") -> Any:
        return connect(f"ws://{self.url.removeprefix('http://')}{path}?token={self.tokens[who]}")


def replica(config: AppConfig, store: Store) -> Any:
    auth = Authenticator(config.auth, KEY, store)
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}

    async def start_engines() -> None:
        for engine in engines.values():
            await engine.start()

    return create_app(
        config, engines, metrics=Metrics(), auth=auth, store=store, on_startup=start_engines
    )


@pytest.fixture
async def tenants(store_url: str) -> AsyncIterator[Tenants]:
    config = AppConfig(
        models=[fake_model("fake", reply_tokens=6, tokens_per_second=300)],
        auth={"clients": CLIENTS, "socket_recheck_s": 0.2},
    )
    store, other_store = Store.from_url(store_url), Store.from_url(store_url)
    async with (
        serving(replica(config, store)) as url,
        serving(replica(config, other_store)) as other_url,
    ):
        tokens = {}
        async with httpx.AsyncClient(base_url=url) as anonymous:
            for name, secret in SECRETS.items():
                r = await anonymous.post(
                    "/auth/token", json={"client_id": name, "client_secret": secret}
                )
                assert r.status_code == 200, r.text
                tokens[name] = r.json()["access_token"]
        yield Tenants([url, other_url], tokens, config, store)


async def test_conversations_are_their_clients_own(tenants: Tenants) -> None:
    async with (
        tenants.http("alice") as alice,
        tenants.http("bob") as bob,
        tenants.http("ops") as ops,
    ):
        said = await alice.post(
            "/v1/messages",
            json={"messages": [{"role": "user", "content": "my password is hunter2"}]},
        )
        assert said.status_code == 200, said.text
        cid = said.json()["conversation_id"]
        mine = (
            await bob.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}]})
        ).json()

        listed = (await bob.get("/v1/conversations")).json()["data"]
        assert [c["id"] for c in listed] == [mine["conversation_id"]]
        for refused in (
            await bob.get(f"/v1/conversations/{cid}"),
            await bob.delete(f"/v1/conversations/{cid}"),
            await bob.post(
                "/v1/messages",
                json={"conversation_id": cid, "messages": [{"role": "user", "content": "x"}]},
            ),
        ):
            # Not found, as an id that never existed: ids cannot be probed.
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["code"] == "not_found"
            assert "hunter2" not in refused.text

        kept = (await alice.get(f"/v1/conversations/{cid}")).json()
        assert kept["owner"] == "alice"
        assert [m["content"] for m in kept["messages"]][:1] == ["my password is hunter2"]
        assert len(kept["messages"]) == 2  # bob's append stored nothing

        # An admin sees and manages everyone's.
        every = {c["id"]: c["owner"] for c in (await ops.get("/v1/conversations")).json()["data"]}
        assert every == {cid: "alice", mine["conversation_id"]: "bob"}
        added = await ops.post(
            "/v1/messages",
            json={"conversation_id": cid, "messages": [{"role": "user", "content": "ops"}]},
        )
        assert added.status_code == 200, added.text
        assert (await alice.get(f"/v1/conversations/{cid}")).json()["message_count"] == 4
        assert (await ops.delete(f"/v1/conversations/{cid}")).status_code == 200
        assert (await alice.get(f"/v1/conversations/{cid}")).status_code == 404


async def session_done(client: httpx.AsyncClient, session_id: str) -> Any:
    async def probe() -> Any:
        body = (await client.get(f"/api/sessions/{session_id}")).json()
        return body if body["status"] == "completed" else None

    return await wait_for(probe)


async def frames_until(ws: ClientConnection, type_: str, session_id: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while not (seen and seen[-1]["type"] == type_ and seen[-1].get("session_id") == session_id):
            seen.append(json.loads(await ws.recv()))
    return seen


async def test_sessions_and_their_events_are_their_clients_own(tenants: Tenants) -> None:
    async with tenants.http("alice") as alice, tenants.http("bob") as bob:
        async with (
            tenants.ws("alice") as alice_ws,
            tenants.ws("bob") as bob_ws,
            tenants.ws("ops") as ops_ws,
        ):
            for ws in (alice_ws, bob_ws, ops_ws):
                assert json.loads(await ws.recv())["type"] == "connected"
            secret = (await alice.post("/api/sessions", json={"message": "hunter2"})).json()
            await session_done(alice, secret["id"])
            own = (await bob.post("/api/sessions", json={"message": "mine"})).json()
            await session_done(bob, own["id"])

            # Bob's feed: his own session's events, none of alice's, though hers came first.
            bob_saw = await frames_until(bob_ws, "session.completed", own["id"])
            assert {f.get("session_id") for f in bob_saw} <= {None, own["id"]}
            alice_saw = await frames_until(alice_ws, "session.completed", secret["id"])
            assert {f.get("session_id") for f in alice_saw} <= {None, secret["id"]}
            ops_saw = await frames_until(ops_ws, "session.completed", own["id"])
            assert {secret["id"], own["id"]} <= {f.get("session_id") for f in ops_saw}

        assert [s["id"] for s in (await bob.get("/api/sessions")).json()["data"]] == [own["id"]]
        for refused in (
            await bob.get(f"/api/sessions/{secret['id']}"),
            await bob.post(f"/api/sessions/{secret['id']}/cancel"),
        ):
            assert refused.status_code == 404, refused.text
            assert "hunter2" not in refused.text
    async with tenants.http("ops") as ops:
        listed = {s["id"]: s["owner"] for s in (await ops.get("/api/sessions")).json()["data"]}
        assert listed == {secret["id"]: "alice", own["id"]: "bob"}
        assert (await ops.get(f"/api/sessions/{secret['id']}")).json()["response"]


async def test_resuming_another_clients_session_is_not_found(tenants: Tenants) -> None:
    async with tenants.http("alice") as alice, tenants.http("bob", other=True) as bob:
        secret = (await alice.post("/api/sessions", json={"message": "hunter2"})).json()
        await session_done(alice, secret["id"])
        refused = await bob.get(f"/api/sessions/{secret['id']}/events")
        own = await alice.get(f"/api/sessions/{secret['id']}/events", params={"after": 0})
    assert refused.status_code == 404, refused.text
    assert "hunter2" not in refused.text
    assert own.status_code == 200 and "hunter2" in own.text  # its owner replays it
    async with tenants.ws("bob") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "resume", "session_id": secret["id"], "after": 0}))
        frame = json.loads(await ws.recv())
    assert (frame["type"], frame["data"]["code"]) == ("error", "not_found")
    assert "hunter2" not in json.dumps(frame)


@pytest.mark.parametrize("path", ["/ws", "/ws/chat"])
async def test_a_token_revoked_through_another_replica_closes_open_sockets(
    tenants: Tenants, path: str
) -> None:
    # Another replica: its own Authenticator over the same store.
    elsewhere = Authenticator(tenants.config.auth, KEY, tenants.store)
    async with tenants.ws("alice", path) as alice_ws, tenants.ws("bob", path) as bob_ws:
        assert json.loads(await alice_ws.recv())["type"] in ("connected", "connection_ack")
        await bob_ws.recv()
        await elsewhere.revoke(tenants.tokens["alice"])
        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    frames.append(json.loads(await alice_ws.recv()))
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            1008,
            "token has been revoked",
        )
        assert [f["code"] for f in frames if f["type"] == "error"] == ["token_revoked"]
        # Bob's token still holds: his socket stays open and answers.
        await bob_ws.send(json.dumps({"type": "ping"}))
        async with asyncio.timeout(5):
            while json.loads(await bob_ws.recv())["type"] != "pong":
                pass


HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_request_budget_holds_across_replicas(tenants: Tenants) -> None:
    async with tenants.http("carol") as here, tenants.http("carol", other=True) as there:
        codes = [
            (await client.post("/v1/chat/completions", json=HELLO)).status_code
            for client in (here, there, here)
        ]
        assert codes == [200, 200, 200]
        refused = await there.post("/v1/chat/completions", json=HELLO)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("budget_exceeded", "requests_per_minute")
        assert "3 requests per minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # Other clients are not affected.
        async with tenants.http("alice") as alice:
            assert (await alice.post("/v1/chat/completions", json=HELLO)).status_code == 200


async def test_a_token_budget_and_usage_per_client(tenants: Tenants) -> None:
    async with tenants.http("dave") as dave, tenants.http("alice") as alice:
        assert (await dave.post("/v1/chat/completions", json=HELLO)).status_code == 200

        async def counted() -> Any:
            body = (await dave.get("/api/usage")).json()
            return body if body["totals"]["requests"] == 1 else None

        usage = await wait_for(counted)  # written when the answer ended
        [row] = usage["data"]
        assert (row["client_id"], row["model"], row["completion_tokens"]) == ("dave", "fake", 6)
        assert row["total_tokens"] >= 6
        scraped = (await dave.get("/metrics")).text
        assert (
            'chatfleet_client_tokens_total{client="dave",kind="completion",model="fake"} 6.0'
            in (scraped)
        )
        # Over the budget of 5 tokens a day: refused on every path, on every replica.
        async with tenants.http("dave", other=True) as there:
            for refused in (
                await there.post("/v1/chat/completions", json=HELLO),
                await dave.post("/api/generate", json={"model": "fake", "prompt": "hi"}),
                await dave.post("/v1/messages", json={"messages": HELLO["messages"]}),
                await dave.post("/api/sessions", json={"message": "hi"}),
            ):
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["param"] == "tokens_per_day"
                assert "resets at" in refused.json()["error"]["message"]
        # Usage is the caller's own; an admin sees and filters everyone's.
        assert (await alice.post("/v1/chat/completions", json=HELLO)).status_code == 200
        await wait_for(lambda: _requests(alice, "/api/usage"))
        assert {r["client_id"] for r in (await alice.get("/api/usage")).json()["data"]} == {"alice"}
        assert (await alice.get("/api/usage", params={"client_id": "dave"})).json()["data"] == []
    async with tenants.http("ops") as ops:
        every = (await ops.get("/api/usage")).json()["data"]
        assert {r["client_id"] for r in every} >= {"alice", "dave"}
        only = (await ops.get("/api/usage", params={"client_id": "dave"})).json()["data"]
        assert {r["client_id"] for r in only} == {"dave"}


async def _requests(client: httpx.AsyncClient, path: str) -> int:
    body = (await client.get(path)).json()
    return int(body["totals"]["requests"])
