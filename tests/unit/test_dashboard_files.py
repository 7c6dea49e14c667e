"""The dashboard's files as the app serves them, without a browser.

Every script and stylesheet the page names is served (public, revalidated), and
nothing comes from elsewhere: the page must work offline, with no CDN.
"""

from __future__ import annotations

import re

import httpx

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.api._dashboard import STATIC_DIR
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine

_REFERENCE = re.compile(r'(?:src|href)="([^"]+)"')


def _client() -> httpx.AsyncClient:
    config = AppConfig(models=[ModelConfig(name="fake", engine="fake")], auth={"enabled": False})
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    app = create_app(config, engines)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatfleet")


async def test_every_file_the_page_names_is_served_and_none_from_elsewhere() -> None:
    async with _client() as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["cache-control"] == "no-cache"
        references = [r for r in _REFERENCE.findall(page.text) if not r.startswith("data:")]
        assert references, "the page names no files"
        for reference in references:
            # Relative to the page, so a path prefix in front of the app keeps working.
            assert reference.startswith("static/"), reference
            served = await client.get("/" + reference)
            assert served.status_code == 200, reference
            assert served.headers["cache-control"] == "no-cache", reference
        scripts = {r.removeprefix("static/") for r in references if r.endswith(".js")}
        # Every script in the package is loaded by the page (none left behind).
        assert scripts == {p.name for p in STATIC_DIR.glob("*.js")}
        for name in scripts:
            text = (STATIC_DIR / name).read_text()
            assert not re.search(r"https?://", text), f"{name} reaches outside the server"
        assert not re.search(r"https?://", page.text)
