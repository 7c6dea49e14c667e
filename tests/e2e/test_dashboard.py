"""The dashboard in headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright).

A real uvicorn server on 127.0.0.1 serves ``create_app`` with auth on, a SQLite
store and paced fake engines, so the stream is slow enough to watch. Screenshots
go to ``test-artifacts/`` (look at them: CI keeps them).

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never
``playwright install``: the tests use the system browser); skipped without them (failed in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from tests.fakes.browser import CHROMIUM, chromium, page_of
from tests.fakes.required import missing

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.store import Store

if not CHROMIUM.exists():
    missing(f"{CHROMIUM} is missing: apt-get install -y chromium", module=True)
from playwright.async_api import Page, expect

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
KEY = "d" * 48
SECRET = "dashboard-secret"
CLIENT = {"client_id": "browser", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest()}
MODELS = [
    # Thinking first, then the answer, at a pace a person (and the test) can follow.
    ModelConfig(
        name="thinker",
        engine="fake",
        description="Thinks, then answers (fake engine)",
        fake={"thinking_tokens": 24, "reply_tokens": 48, "tokens_per_second": 30},
    ),
    ModelConfig(
        name="slow",
        engine="fake",
        description="Very long answer (fake engine)",
        fake={"reply_tokens": 5000, "tokens_per_second": 20},
    ),
]
TIMEOUT_MS = 20_000


@dataclass
class Server:
    url: str
    token: str
    http: httpx.AsyncClient


class _Uvicorn:
    """``create_app`` under uvicorn in this event loop, on a port that can be reused."""

    def __init__(self, db: Path, port: int = 0) -> None:
        self.config = AppConfig(
            models=MODELS,
            auth={"clients": [CLIENT], "rate_limit": {"requests_per_minute": 6000, "burst": 500}},
        )
        self.auth = Authenticator(self.config.auth, KEY, MemoryRevocationStore())
        self.engines = {
            m.name: LocalEngineClient(FakeEngine(m), self.config.coalesce)
            for m in self.config.models
        }
        self.app = create_app(
            self.config,
            self.engines,
            store=Store.from_url(f"sqlite+aiosqlite:///{db}"),
            auth=self.auth,
            on_startup=self._start_engines,
        )
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port: int = self.sock.getsockname()[1]

    async def _start_engines(self) -> None:
        for engine in self.engines.values():
            await engine.start()

    async def start(self) -> None:
        config = uvicorn.Config(self.app, lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)
        self.sock.close()


@contextlib.asynccontextmanager
async def running(db: Path, port: int = 0) -> AsyncIterator[_Uvicorn]:
    server = _Uvicorn(db, port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running(tmp_path / "dashboard.db") as uv:
        url = f"http://127.0.0.1:{uv.port}"
        token = uv.auth.mint("browser", ["chat"]).access_token
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
            yield Server(url, token, http)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with chromium() as browser, page_of(browser) as page:
        yield page


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    return path


# Records when each pane first shows text (performance.now()), to check the order.
_WATCH_PANES = """() => {
  window.firstText = {};
  for (const id of ["thinking", "response"]) {
    const node = document.getElementById(id);
    new MutationObserver(() => {
      if (node.textContent && !(id in window.firstText)) window.firstText[id] = performance.now();
    }).observe(node, {childList: true, characterData: true, subtree: true});
  }
}"""


async def test_message_streams_thinking_then_response(page: Page, server: Server) -> None:
    await page.goto(f"{server.url}/#token={server.token}")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=TIMEOUT_MS
    )
    # The token left the address bar for localStorage.
    assert "token" not in page.url
    assert await page.evaluate("localStorage.getItem('chatfleet.token')") == server.token
    await expect(page.locator("#banner")).to_be_hidden()
    await expect(page.locator("#model option[value=thinker]")).to_have_count(1)

    # The playground is the first view; sessions are a tab away.
    await page.click(".tab[data-view=sessions]")
    await page.select_option("#model", "thinker")
    await page.evaluate(_WATCH_PANES)
    await page.fill("#message", "Why is the sky blue?")
    await page.click("#send")

    thinking, response = page.locator("#thinking"), page.locator("#response")
    await expect(thinking).to_have_text(re.compile(r"\w+"), timeout=TIMEOUT_MS)
    await expect(page.locator("#detail-status")).to_have_text(
        re.compile("pending|running"), timeout=TIMEOUT_MS
    )
    await expect(response).to_have_text(re.compile(r"\w+"), timeout=TIMEOUT_MS)
    await page.wait_for_function("document.getElementById('response').textContent.length > 40")
    await screenshot(page, "dashboard-streaming.png")
    await expect(page.locator("#detail-status")).to_have_text("completed", timeout=TIMEOUT_MS)

    firsts = await page.evaluate("window.firstText")
    assert firsts["thinking"] < firsts["response"], firsts
    item = page.locator("#sessions .session-item")
    await expect(item).to_have_count(1)
    await expect(item).to_have_attribute("data-status", "completed")
    await expect(item.locator(".badge")).to_have_text("completed")
    await expect(item.locator(".title")).to_have_text("Why is the sky blue?")
    await expect(page.locator("#cancel")).to_be_disabled()

    # What the page shows is what the server stored, thinking and answer apart.
    session_id = await item.get_attribute("data-session-id")
    stored = (await server.http.get(f"/api/sessions/{session_id}")).json()
    assert stored["status"] == "completed"
    assert len(stored["thinking"].split()) == 24
    assert len(stored["response"].split()) == 48
    assert await thinking.text_content() == stored["thinking"]
    assert await response.text_content() == stored["response"]
    await screenshot(page, "dashboard.png")


async def test_sessions_from_elsewhere_are_listed_live(page: Page, server: Server) -> None:
    before = await server.http.post(
        "/api/sessions", json={"message": "earlier", "model": "thinker"}
    )
    assert before.status_code == 202
    await page.goto(f"{server.url}/#token={server.token}")
    await page.click(".tab[data-view=sessions]")
    await expect(page.locator("#sessions .session-item")).to_have_count(1, timeout=TIMEOUT_MS)
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=TIMEOUT_MS
    )
    # Another client starts a session: the list gets it from WS /ws, no reload.
    other = await server.http.post("/api/sessions", json={"message": "from curl", "model": "slow"})
    item = page.locator(f"#sessions [data-session-id='{other.json()['id']}']")
    await expect(item).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    await expect(page.locator("#sessions .session-item").first).to_contain_text("from curl")

    await item.click()
    await expect(page.locator("#response")).to_have_text(re.compile(r"\w+"), timeout=TIMEOUT_MS)
    await page.click("#cancel")
    await expect(page.locator("#detail-status")).to_have_text("cancelled", timeout=TIMEOUT_MS)
    await expect(item).to_have_attribute("data-status", "cancelled")
    stored = (await server.http.get(f"/api/sessions/{other.json()['id']}")).json()
    assert stored["status"] == "cancelled"
    await screenshot(page, "dashboard-cancelled.png")
    # The one that was running before the page opened finishes in the list too.
    earlier = page.locator(f"#sessions [data-session-id='{before.json()['id']}']")
    await expect(earlier).to_have_attribute("data-status", "completed", timeout=TIMEOUT_MS)
    await earlier.click()
    stored = (await server.http.get(f"/api/sessions/{before.json()['id']}")).json()
    await expect(page.locator("#response")).to_have_text(stored["response"])
    await expect(page.locator("#thinking")).to_have_text(stored["thinking"])


async def test_a_reload_resumes_a_running_session_with_every_token_once(
    page: Page, server: Server
) -> None:
    started = await server.http.post(
        "/api/sessions", json={"message": "a long one", "model": "thinker"}
    )
    session_id = started.json()["id"]
    item = page.locator(f"#sessions [data-session-id='{session_id}']")
    response = page.locator("#response")
    await page.goto(f"{server.url}/#token={server.token}")
    await page.click(".tab[data-view=sessions]")
    await item.click()
    await expect(response).to_have_text(re.compile(r"\w+"), timeout=TIMEOUT_MS)
    await page.reload()  # mid-answer: the page must pick the session up where it is
    await page.click(".tab[data-view=sessions]")
    await item.click()
    await page.wait_for_function(
        "document.getElementById('response').textContent.split(' ').length > 6"
    )
    midway = await response.text_content() or ""
    status = await page.locator("#detail-status").text_content()
    await expect(page.locator("#detail-status")).to_have_text("completed", timeout=TIMEOUT_MS)
    stored = (await server.http.get(f"/api/sessions/{session_id}")).json()
    # Replayed from the server's events, not a checkpoint plus what came next: what the
    # page showed midway is the start of the answer, with no gap and nothing twice.
    if status == "running":
        assert stored["response"].startswith(midway), (midway, stored["response"])
    await expect(response).to_have_text(stored["response"])
    await expect(page.locator("#thinking")).to_have_text(stored["thinking"])


async def test_bad_token_shows_401_and_client_credentials_recover(
    page: Page, server: Server
) -> None:
    await page.goto(f"{server.url}/#token=not-a-valid-token")
    banner = page.locator("#banner")
    await expect(banner).to_be_visible(timeout=TIMEOUT_MS)
    await expect(banner).to_contain_text("Not authorized (401)")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "unauthorized")
    await expect(page.locator("#auth-panel")).to_be_visible()
    await screenshot(page, "dashboard-401.png")

    # A registered client's id and secret get a token through POST /auth/token.
    await page.fill("#client-id", "browser")
    await page.fill("#client-secret", SECRET)
    await page.click("#client-form button[type=submit]")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=TIMEOUT_MS
    )
    await expect(banner).to_be_hidden()
    await expect(page.locator("#auth-panel")).to_be_hidden()
    assert await page.evaluate("localStorage.getItem('chatfleet.refresh_token')")


async def test_no_token_asks_for_one(page: Page, server: Server) -> None:
    await page.goto(server.url)
    await expect(page.locator("#banner")).to_contain_text(
        "This server requires a token", timeout=TIMEOUT_MS
    )
    await page.fill("#token-input", server.token)
    await page.click("#token-form button[type=submit]")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=TIMEOUT_MS
    )
    await expect(page.locator("#model option[value=slow]")).to_have_count(1)


async def test_reconnects_after_a_server_restart(page: Page, tmp_path: Path) -> None:
    db = tmp_path / "restart.db"
    first = _Uvicorn(db)
    port = first.port
    token = first.auth.mint("browser", ["chat"]).access_token
    await first.start()
    try:
        await page.goto(f"http://127.0.0.1:{port}/#token={token}")
        connection = page.locator("#connection")
        await expect(connection).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
    finally:
        await first.stop()
    # Backing off: the indicator says so and counts attempts.
    await expect(connection).to_have_attribute("data-state", "reconnecting", timeout=TIMEOUT_MS)
    await expect(page.locator("#connection-text")).to_contain_text("attempt")
    # The live figures say they are stale rather than showing old numbers as current.
    await expect(page.locator("#figures-status")).to_contain_text("stale", timeout=TIMEOUT_MS)
    await asyncio.sleep(1.5)
    async with running(db, port) as second:
        await expect(connection).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
        # The same signing key: the page's token still works; the new server's events arrive.
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{second.port}") as http:
            created = await http.post(
                "/api/sessions", json={"message": "after restart"}, headers=headers
            )
        assert created.status_code == 202, created.text
        item = page.locator(f"#sessions [data-session-id='{created.json()['id']}']")
        await expect(item).to_have_attribute("data-status", "completed", timeout=TIMEOUT_MS)
        await expect(page.locator("#figures-status")).to_contain_text("updated", timeout=TIMEOUT_MS)
