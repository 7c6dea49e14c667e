"""Auth: tokens, refresh rotation, revocation, enforcement, rate limits, the signing key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import chatfleet.serving.auth as auth_pkg
from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import (
    Authenticator,
    MemoryRevocationStore,
    RateLimiter,
    load_signing_key,
)
from chatfleet.serving.config import AppConfig, AuthConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import AuthenticationError, InvalidClient

KEY = "k" * 48
SECRET = "s3cret-of-the-app"
CLIENTS = [
    {"client_id": "app", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest()},
    {"client_id": "ops", "secret_env": "OPS_SECRET", "scopes": ["chat", "admin"]},
]
ENV = {"OPS_SECRET": "ops-secret"}
APP = {"client_id": "app", "client_secret": SECRET}


def auth_config(**fields: Any) -> AuthConfig:
    return AuthConfig.model_validate({"clients": CLIENTS, **fields})


def make_auth(config: AuthConfig | None = None, **kwargs: Any) -> Authenticator:
    return Authenticator(
        config or auth_config(), KEY, MemoryRevocationStore(), environ=ENV, **kwargs
    )


def test_public_surface() -> None:
    assert auth_pkg.__all__ == [
        "Authenticator",
        "Claims",
        "MemoryRevocationStore",
        "RateLimiter",
        "RevocationStore",
        "TokenPair",
        "TokenType",
        "data_dir",
        "load_signing_key",
        "local_signing_key",
    ]


# ---- Authenticator ------------------------------------------------------------------


async def test_issue_validate_and_claims() -> None:
    auth = make_auth()
    pair = await auth.issue("ops", "ops-secret")
    claims = await auth.validate(pair.access_token)
    assert claims.client_id == "ops"
    assert claims.scopes == ("chat", "admin")
    assert claims.token_type == "access"
    assert claims.expires_at - claims.issued_at == 900
    assert set(claims.as_dict()) == {"sub", "scope", "type", "jti", "iat", "exp", "iss"}
    # A refresh token is not an access token.
    with pytest.raises(AuthenticationError, match="expected an access token"):
        await auth.validate(pair.refresh_token)
    assert (await auth.validate(pair.refresh_token, token_type="refresh")).token_type == "refresh"


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("app", "wrong"), ("nobody", SECRET), ("app", ""), ("ops", SECRET)],
)
async def test_wrong_credentials_are_invalid_client(client_id: str, secret: str) -> None:
    with pytest.raises(InvalidClient):
        await make_auth().issue(client_id, secret)


async def test_client_whose_secret_env_is_unset_cannot_get_tokens() -> None:
    auth = Authenticator(auth_config(), KEY, MemoryRevocationStore(), environ={})
    with pytest.raises(InvalidClient):
        await auth.issue("ops", "")
    assert (await auth.issue("app", SECRET)).access_token


async def test_refresh_rotates_and_old_refresh_token_is_single_use() -> None:
    auth = make_auth()
    first = await auth.issue("app", SECRET)
    second = await auth.refresh(first.refresh_token)
    assert (await auth.validate(second.access_token)).client_id == "app"
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.refresh(first.refresh_token)
    with pytest.raises(AuthenticationError, match="expected a refresh token"):
        await auth.refresh(second.access_token)


async def test_expired_forged_and_malformed_tokens() -> None:
    auth = make_auth()
    past = make_auth(clock=lambda: time.time() - 10_000)
    expired = past.mint("app", ["chat"]).access_token
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.validate(expired)
    forged = Authenticator(auth_config(), "x" * 48, MemoryRevocationStore()).mint("app", ["chat"])
    other_issuer = make_auth(auth_config(issuer="someone-else")).mint("app", ["chat"])
    none_alg = jwt.encode({"sub": "app"}, None, algorithm="none")  # type: ignore[arg-type]
    for bad in (forged.access_token, other_issuer.access_token, none_alg, "garbage", ""):
        with pytest.raises(AuthenticationError, match="invalid token"):
            await auth.validate(bad)


async def test_revocation_through_another_replica_holds_within_the_cache_window() -> None:
    shared = MemoryRevocationStore()
    here = Authenticator(auth_config(), KEY, shared, revocation_cache_s=0.2)
    there = Authenticator(auth_config(), KEY, shared, revocation_cache_s=0.2)
    token = here.mint("app", ["chat"]).access_token
    await here.validate(token)  # cached as valid here
    await there.revoke(token)
    with pytest.raises(AuthenticationError, match="revoked"):
        await there.validate(token)  # at once where it was revoked
    await here.validate(token)  # still cached here...
    await asyncio.sleep(0.25)
    with pytest.raises(AuthenticationError, match="revoked"):
        await here.validate(token)  # ...but not for longer than the window


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0.0  # per client
    now[0] = 1.0
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0


# ---- the signing key --------------------------------------------------------------


def test_local_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    config = AuthConfig()
    first = load_signing_key(config, tmp_path / "data", environ={})
    assert len(first) >= 32
    path = tmp_path / "data" / "jwt-signing-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(config, tmp_path / "data", environ={}) == first
    # The data folder defaults to $CHATFLEET_DATA_DIR.
    env = {"CHATFLEET_DATA_DIR": str(tmp_path / "data")}
    assert load_signing_key(config, environ=env) == first
    # The environment (a Secret in a cluster) wins; short keys are refused.
    assert load_signing_key(config, tmp_path, environ={"CHATFLEET_JWT_SIGNING_KEY": KEY}) == KEY
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        load_signing_key(config, tmp_path, environ={"CHATFLEET_JWT_SIGNING_KEY": "short"})


# ---- over HTTP ----------------------------------------------------------------------


def app_config(**auth: Any) -> AppConfig:
    return AppConfig(
        models=[ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 5})],
        auth={"clients": CLIENTS, **auth},
    )


async def http_client(config: AppConfig, auth: Authenticator) -> httpx.AsyncClient:
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    for engine in engines.values():
        await engine.start()
    app = create_app(config, engines, metrics=Metrics(), auth=auth)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cf")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    config = app_config()
    async with await http_client(config, make_auth(config.auth)) as c:
        yield c


async def get_tokens(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/auth/token", json={"client_id": "app", "client_secret": SECRET})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_create_app_refuses_auth_on_without_an_authenticator() -> None:
    config = app_config()
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    with pytest.raises(ValueError, match="needs an Authenticator"):
        create_app(config, engines)


async def test_token_json_form_and_basic(client: httpx.AsyncClient) -> None:
    body = await get_tokens(client)
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert body["scope"] == "chat"
    form = {"grant_type": "client_credentials", "client_id": "app", "client_secret": SECRET}
    assert (await client.post("/auth/token", data=form)).status_code == 200
    basic = base64.b64encode(f"app:{SECRET}".encode()).decode()
    r = await client.post("/auth/token", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"client_id": "app", "client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "ghost", "client_secret": SECRET}, 401, "invalid_client"),
        ({"client_id": "app"}, 400, "invalid_request_error"),
        ({"grant_type": "password", "client_id": "app", "client_secret": SECRET}, 400, None),
        ({"client_id": "app", "client_secret": SECRET, "scope": "admin"}, 400, None),
    ],
)
async def test_token_refusals(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, code: str | None
) -> None:
    r = await client.post("/auth/token", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if code:
        assert r.json()["error"]["code"] == code
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_protected_and_public_paths(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert (await client.get(path)).status_code == 200, path
    # The dashboard and its static files are public.
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/static/app.js")).status_code == 200
    assert (await client.get("/static/missing.js")).status_code == 404
    r = await client.get("/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_token"
    assert r.headers["www-authenticate"] == 'Bearer realm="chatfleet"'
    assert (await client.get("/ws/health")).status_code == 401
    assert (await client.post("/auth/validate", json={})).status_code == 401
    tokens = await get_tokens(client)
    r = await client.get("/v1/models", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json=chat, headers=bearer(tokens["access_token"]))
    assert r.status_code == 200, r.text


async def test_openapi_declares_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/auth/token"]["post"]["security"] == []
    assert "security" not in schema["paths"]["/v1/models"]["get"]


async def test_bad_tokens_are_401(client: httpx.AsyncClient) -> None:
    expired = make_auth(clock=lambda: time.time() - 10_000).mint("app", ["chat"]).access_token
    forged = Authenticator(auth_config(), "f" * 48, MemoryRevocationStore()).mint("app", ["chat"])
    tokens = await get_tokens(client)
    cases = {
        "expired": bearer(expired),
        "forged": bearer(forged.access_token),
        "malformed": bearer("not.a.jwt"),
        "refresh used as access": bearer(tokens["refresh_token"]),
        "wrong scheme": {"Authorization": f"Token {tokens['access_token']}"},
        "empty bearer": {"Authorization": "Bearer "},
    }
    for name, headers in cases.items():
        r = await client.get("/v1/models", headers=headers)
        assert r.status_code == 401, name
        assert r.json()["error"]["type"] == "authentication_error", name
        assert 'error="invalid_token"' in r.headers["www-authenticate"], name


async def test_refresh_validate_revoke_over_http(client: httpx.AsyncClient) -> None:
    first = await get_tokens(client)
    r = await client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200, r.text
    second = r.json()
    # Rotation: the old refresh token is spent.
    r = await client.post("/auth/refresh", data={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]

    access = bearer(second["access_token"])
    r = await client.post("/auth/validate", json={}, headers=access)
    assert r.status_code == 200
    assert r.json()["claims"]["sub"] == "app"
    assert r.json()["claims"]["type"] == "access"
    r = await client.post("/auth/validate", json={"token": second["refresh_token"]}, headers=access)
    assert r.json()["claims"]["type"] == "refresh"
    r = await client.post("/auth/validate", json={"token": "garbage"}, headers=access)
    assert r.status_code == 401

    # Revoke the refresh token, then the access token itself (logout).
    r = await client.post("/auth/revoke", json={"token": second["refresh_token"]}, headers=access)
    assert r.status_code == 200
    assert r.json()["type"] == "refresh"
    r = await client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401
    assert (await client.post("/auth/revoke", headers=access)).status_code == 200
    r = await client.get("/v1/models", headers=access)
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]


async def test_cannot_revoke_another_clients_token(client: httpx.AsyncClient) -> None:
    mine = await get_tokens(client)
    r = await client.post("/auth/token", json={"client_id": "ops", "client_secret": "ops-secret"})
    theirs = r.json()
    r = await client.post(
        "/auth/revoke", json={"token": theirs["access_token"]}, headers=bearer(mine["access_token"])
    )
    assert r.status_code == 400
    assert (await client.get("/v1/models", headers=bearer(theirs["access_token"]))).is_success


async def test_rate_limit_429_with_retry_after() -> None:
    config = app_config(rate_limit={"requests_per_minute": 6, "burst": 2})
    async with await http_client(config, make_auth(config.auth)) as c:
        tokens = await get_tokens(c)
        headers = bearer(tokens["access_token"])
        assert (await c.get("/v1/models", headers=headers)).status_code == 200
        assert (await c.get("/v1/models", headers=headers)).status_code == 200
        r = await c.get("/v1/models", headers=headers)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 10
        # Public paths are not counted, nor is getting a token (guessing has its own limits).
        assert (await c.get("/healthz")).status_code == 200
        for _ in range(3):
            assert (await c.post("/auth/token", json=APP)).status_code == 200


def from_address(address: str) -> dict[str, str]:
    # One proxy in front appends the client's address (auth.guessing.forwarded_hops: 1);
    # what the client itself put in the header (left of it) is not believed.
    return {"X-Forwarded-For": f"203.0.113.99, {address}"}


async def test_wrong_secrets_cost_the_address_not_the_client() -> None:
    guessing = {"failures_per_client_address": 3, "failures_per_address": 5, "forwarded_hops": 1}
    config = app_config(guessing=guessing)
    async with await http_client(config, make_auth(config.auth)) as c:
        wrong = {"client_id": "ops", "client_secret": "guess"}
        codes = [
            (await c.post("/auth/token", json=wrong, headers=from_address("10.0.0.1"))).status_code
            for _ in range(1000)
        ]
        assert codes[:3] == [401, 401, 401]
        assert set(codes[3:]) == {429}
        refused = await c.post("/auth/token", json=wrong, headers=from_address("10.0.0.1"))
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # The guesser's address is stopped even with the right secret: it learns nothing.
        right = {"client_id": "ops", "client_secret": ENV["OPS_SECRET"]}
        headers = from_address("10.0.0.1")
        assert (await c.post("/auth/token", json=right, headers=headers)).status_code == 429
        # The right secret from anywhere else still works: no one can lock a client out.
        ok = await c.post("/auth/token", json=right, headers=from_address("10.0.0.2"))
        assert ok.status_code == 200, ok.text
        # A spray over many client ids from one address is stopped too.
        spray = [
            await c.post(
                "/auth/token",
                json={"client_id": f"client-{i}", "client_secret": "guess"},
                headers=from_address("10.0.0.3"),
            )
            for i in range(8)
        ]
        assert [r.status_code for r in spray] == [401] * 5 + [429] * 3
        assert (
            await c.post("/auth/token", json=APP, headers=from_address("10.0.0.3"))
        ).status_code == 429
        assert (
            await c.post("/auth/token", json=APP, headers=from_address("10.0.0.4"))
        ).status_code == 200


def test_the_source_address_believes_only_the_hops_configured() -> None:
    from starlette.requests import Request

    from chatfleet.serving.api._source import source_address

    def request(*forwarded: str) -> Request:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return Request({"type": "http", "headers": headers, "client": ("10.1.1.1", 5000)})

    assert source_address(request("1.1.1.1"), 0) == "10.1.1.1"  # no proxy: the peer
    assert source_address(request("6.6.6.6, 1.1.1.1"), 1) == "1.1.1.1"
    assert source_address(request("6.6.6.6, 1.1.1.1", "2.2.2.2"), 2) == "1.1.1.1"
    assert source_address(request(), 1) == "10.1.1.1"  # no header: the peer


async def test_auth_off_serves_everyone_and_has_no_auth_routes() -> None:
    config = app_config(enabled=False)
    async with await http_client(config, make_auth(config.auth)) as c:
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.post("/auth/token", json={})).status_code == 404


# ---- with the real store ------------------------------------------------------------


async def test_revocation_survives_a_restart_with_the_sql_store(tmp_path: Path) -> None:
    from chatfleet.serving.store import Store

    config = app_config()
    url = f"sqlite+aiosqlite:///{tmp_path}/chat.db"

    async def run(steps: Any) -> Any:
        # One server lifetime: a store on the same file, a fresh app and Authenticator.
        store = Store.from_url(url)
        await store.start()
        try:
            auth = Authenticator(config.auth, KEY, store, environ=ENV)
            engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
            app = create_app(config, engines, metrics=Metrics(), store=store, auth=auth)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cf") as c:
                return await steps(c)
        finally:
            await store.close()

    async def before(c: httpx.AsyncClient) -> dict[str, Any]:
        old = await get_tokens(c)
        kept = await get_tokens(c)
        r = await c.post("/auth/refresh", json={"refresh_token": old["refresh_token"]})
        assert r.status_code == 200
        r = await c.post("/auth/revoke", headers=bearer(old["access_token"]))
        assert r.status_code == 200
        return {"old": old, "kept": kept}

    async def after(c: httpx.AsyncClient, tokens: dict[str, Any]) -> None:
        old, kept = tokens["old"], tokens["kept"]
        r = await c.get("/v1/models", headers=bearer(old["access_token"]))
        assert r.status_code == 401
        assert "revoked" in r.json()["error"]["message"]
        r = await c.post("/auth/refresh", json={"refresh_token": old["refresh_token"]})
        assert r.status_code == 401  # spent by the rotation before the restart
        assert (await c.get("/v1/models", headers=bearer(kept["access_token"]))).is_success

    tokens = await run(before)
    await run(lambda c: after(c, tokens))


# ---- chatfleet serve ----------------------------------------------------------------


async def test_serve_registers_a_local_client_and_prints_a_working_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatfleet.serving import cli

    monkeypatch.setenv("CHATFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CHATFLEET_JWT_SIGNING_KEY", raising=False)
    config = cli._serve_config(cli._parser().parse_args(["serve", "--engine", "fake"]))
    assert config.auth.enabled
    deployed, lines, token = cli._local_access(config, "http://127.0.0.1:8000")
    assert token is not None
    assert token in lines
    assert [c.client_id for c in deployed.auth.clients] == ["local"]
    # The ingress builds its Authenticator from the deployed config and the same key file.
    server_side = Authenticator.from_config(deployed.auth, MemoryRevocationStore())
    assert (await server_side.validate(token)).client_id == "local"
    secret = lines.split("client_secret=")[1].split()[0]
    assert (await server_side.issue("local", secret)).access_token
    assert (tmp_path / "jwt-signing-key").exists()

    off = cli._serve_config(cli._parser().parse_args(["serve", "--engine", "fake", "--no-auth"]))
    assert not off.auth.enabled
    assert cli._local_access(off, "http://x")[2] is None
