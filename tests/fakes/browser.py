"""Headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright, for page tests.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never
``playwright install``: the tests use the system browser). Playwright is imported
only when a browser starts, so a test module can check `CHROMIUM` first
(``missing(..., module=True)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "chromium", "page_of"]

CHROMIUM = Path("/usr/bin/chromium")
# The flags NOTES.md found to work on these machines (no sandbox, no network chatter).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def page_of(browser: Browser, width: int = 1280, height: int = 800) -> AsyncIterator[Page]:
    """A page in a fresh context; fails the test if the page's JavaScript threw."""
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
