"""The dashboard's playground, classify/compress and live figures in headless Chromium.

A real uvicorn server serves ``create_app`` with auth on and the embedded default's
pipeline as ``chatfleet serve --engine fake`` runs it: the real MiniLM classifier,
routing for ``auto`` (coding and maths to ``fake-reasoner``), LLMLingua on SmolLM2.
The fake engines are paced so streams are visible. What the page shows is checked
against what the server said (the route header of the same response, ``/api/classify``,
``/metrics``). Screenshots go to ``test-artifacts/``; with
``CHATFLEET_UPDATE_SCREENSHOTS=1`` to ``docs/img/``, the README's (a plain test run
leaves the checkout clean).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fakes.app_server import serving
from tests.fakes.browser import CHROMIUM, chromium, page_of
from tests.fakes.local_routing import LocalRouting
from tests.fakes.required import missing

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig
from chatfleet.serving.config._app import embedded_pipeline
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.store import Store

if not CHROMIUM.exists():
    missing(f"{CHROMIUM} is missing: apt-get install -y chromium", module=True)
from playwright.async_api import Page, expect

_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = (
    _ROOT / "docs" / "img"
    if os.environ.get("CHATFLEET_UPDATE_SCREENSHOTS") == "1"
    else _ROOT / "test-artifacts"
)
KEY = "p" * 48
TIMEOUT_MS = 30_000
PACE = {"reply_tokens": 40, "tokens_per_second": 60}
# The embedded fake profile's routes, with paced simulators and two more models for
# the figures: one long stream to see in flight, one that fails mid-answer.
MODELS = [
    {"name": "fake", "engine": "fake", "fake": PACE},
    {"name": "fake-reasoner", "engine": "fake", "fake": {**PACE, "thinking_tokens": 24, "seed": 1}},
    {"name": "slow", "engine": "fake", "fake": {"reply_tokens": 5000, "tokens_per_second": 20}},
    {"name": "broken", "engine": "fake", "fake": {**PACE, "fail_after_tokens": 3}},
]
CODING = "Write a Python function that reverses a linked list in place."
MATHS = "What is the integral of x squared from 0 to 3?"
# Over the compressor's 400-token threshold; the last paragraph is the question.
REPORT = " ".join(
    f"On day {day} the harbour committee reviewed the budget for the new pier, heard"
    f" {day + 2} complaints about the ferry timetable from residents of the north shore,"
    " and asked the engineers to cost a wider breakwater before the winter storms."
    for day in range(1, 15)
)
LONG_PROMPT = f"{REPORT}\n\nSummarise what the committee asked the engineers to do."


def pipeline_config() -> AppConfig:
    return AppConfig.model_validate(
        {
            **embedded_pipeline("fake"),
            "models": MODELS,
            "auth": {"rate_limit": {"requests_per_minute": 6000, "burst": 500}},
        }
    )


@dataclass
class Server:
    url: str
    token: str
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
def routing() -> LocalRouting:
    # Loading MiniLM and SmolLM2 takes seconds: once for the module.
    return LocalRouting(pipeline_config())


@pytest.fixture
async def server(routing: LocalRouting, tmp_path: Path) -> AsyncIterator[Server]:
    config = pipeline_config()
    auth = Authenticator(config.auth, KEY, MemoryRevocationStore())
    engines = {m.name: LocalEngineClient(FakeEngine(m), config.coalesce) for m in config.models}

    async def start_engines() -> None:
        for engine in engines.values():
            await engine.start()

    app = create_app(
        config,
        engines,
        router=routing.router(config),
        classifier=routing,
        compressor=routing,
        store=Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'playground.db'}"),
        auth=auth,
        on_startup=start_engines,
    )
    token = auth.mint("browser", ["chat"]).access_token
    async with serving(app) as url:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            yield Server(url, token, http)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with chromium() as browser, page_of(browser, height=900) as page:
        yield page


async def open_dashboard(page: Page, server: Server) -> None:
    await page.goto(f"{server.url}/#token={server.token}")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=TIMEOUT_MS
    )
    await expect(page.locator("#pg-model option[value=fake-reasoner]")).to_have_count(1)
    await expect(page.locator("#figures")).to_have_attribute("data-scrapes", re.compile(r"\d"))
    await expect(page.locator("#banner")).to_be_hidden()


async def ask(page: Page, model: str, text: str) -> dict[str, Any] | None:
    """Send ``text`` from the playground; the route header of that very response."""
    await page.select_option("#pg-model", model)
    await page.fill("#pg-message", text)
    async with page.expect_response("**/v1/chat/completions") as response_info:
        await page.click("#pg-send")
    response = await response_info.value
    turn = page.locator(".turn").last
    await expect(turn).to_have_attribute(
        "data-state", re.compile("done|failed"), timeout=TIMEOUT_MS
    )
    header = (await response.all_headers()).get("x-chatfleet-route")
    return None if header is None else dict(json.loads(header))


def route_cell(page: Page, key: str) -> Any:
    return page.locator(f".turn >> nth=-1 >> .route dd[data-route={key}]")


async def test_playground_auto_shows_the_route_beside_each_answer(
    page: Page, server: Server
) -> None:
    await open_dashboard(page, server)
    # The playground is the first view; auto is preselected.
    await expect(page.locator("#view-playground")).to_be_visible()
    assert await page.input_value("#pg-model") == "auto"

    route = await ask(page, "auto", CODING)
    assert route is not None
    assert route["category"] == "coding" and route["model"] == "fake-reasoner"
    # The page shows the route the server sent with this answer.
    await expect(route_cell(page, "category")).to_have_text("coding")
    await expect(route_cell(page, "model")).to_have_text("fake-reasoner")
    await expect(route_cell(page, "reason")).to_have_text("route")
    await expect(route_cell(page, "fallbacks")).to_have_text("fake")
    await expect(route_cell(page, "compression")).to_have_text("nothing to compress")
    shown = float(await route_cell(page, "confidence").get_attribute("data-value") or "nan")
    assert shown == pytest.approx(route["confidence"], abs=1e-4)
    nearest = page.locator(".turn >> nth=-1 >> .route .nearest-list li")
    assert await nearest.count() >= 1
    assert route["nearest"]["example"][:40] in (await nearest.first.text_content() or "")
    # fake-reasoner thinks first; the answer streamed in full.
    turn = page.locator(".turn").last
    await expect(turn.locator(".thinking")).to_be_visible()
    await expect(turn.locator(".answer-text")).to_have_text(re.compile(r"^(\S+\s+){39}\S+$"))
    # Usage counts the thinking too: 24 + 40.
    await expect(turn.locator(".answer-meta")).to_contain_text("fake-reasoner · 64 tokens")

    # A long prompt is compressed before it is answered: the saving is shown.
    route = await ask(page, "auto", LONG_PROMPT)
    assert route is not None and not route["compression"]["skipped"]
    c = route["compression"]
    saved = c["original_tokens"] - c["compressed_tokens"]
    assert saved > 0
    await expect(route_cell(page, "compression")).to_contain_text(
        f"{c['original_tokens']} → {c['compressed_tokens']} tokens (saved {saved},"
    )
    await expect(route_cell(page, "category")).to_have_text(route["category"])
    await page.locator(".turn").first.scroll_into_view_if_needed()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "dashboard-playground.png"), full_page=True)

    # A named model is not routed, and the page says so.
    assert await ask(page, "fake", "hello there") is None
    await expect(page.locator(".turn >> nth=-1 >> .route")).to_have_attribute(
        "data-routed", "false"
    )
    # A model that fails mid-answer: the page shows the server's error, and the
    # failed turn stays out of the chat the next question carries.
    await ask(page, "broken", "hello again")
    failed = page.locator(".turn").last
    await expect(failed).to_have_attribute("data-state", "failed")
    await expect(failed.locator(".error-text")).to_contain_text("Failed:")
    async with page.expect_request("**/v1/chat/completions") as request_info:
        await ask(page, "fake", "and now?")
    sent = (await request_info.value).post_data_json
    assert [m["content"] for m in sent["messages"] if m["role"] == "user"] == [
        CODING,
        LONG_PROMPT,
        "hello there",
        "and now?",
    ]
    assert len(sent["messages"]) == 7


async def test_classify_and_compress_in_the_page(page: Page, server: Server) -> None:
    await open_dashboard(page, server)
    await page.click(".tab[data-view=tools]")
    await page.fill("#cl-prompt", MATHS)
    await page.click("#cl-send")
    result = page.locator("#cl-result")
    await expect(result).to_have_attribute("data-category", "maths", timeout=TIMEOUT_MS)
    expected = (await server.http.post("/api/classify", json={"prompt": MATHS})).json()
    rows = page.locator("#cl-scores li")
    await expect(rows).to_have_count(len(expected["labels"]))
    for i, label in enumerate(expected["labels"]):
        assert await rows.nth(i).get_attribute("data-label") == label
        shown = float(await rows.nth(i).get_attribute("data-score") or "nan")
        assert shown == pytest.approx(expected["scores"][i], abs=1e-6)
    await expect(page.locator("#cl-confidence")).to_contain_text(
        f"{100 * expected['confidence']:.1f}%"
    )
    await expect(page.locator("#cl-nearest ol[data-label=maths] li").first).to_be_visible()

    await page.fill("#cp-text", REPORT)
    await page.fill("#cp-question", "What did the committee ask the engineers?")
    await page.fill("#cp-ratio", "0.4")
    await page.click("#cp-send")
    compressed = page.locator("#cp-result")
    await expect(compressed).to_have_attribute("data-skipped", "false", timeout=TIMEOUT_MS)
    ratio = float(await compressed.get_attribute("data-ratio") or "nan")
    assert 0 < ratio < 0.8
    output = await page.locator("#cp-output").text_content() or ""
    assert 0 < len(output.split()) < len(REPORT.split())
    await expect(page.locator("#cp-summary")).to_contain_text(f"ratio {ratio:.2f}")
    await expect(page.locator("#cp-summary")).to_contain_text("saved")
    await page.screenshot(path=str(SCREENSHOTS / "dashboard-classify-compress.png"), full_page=True)

    # Labels of the user's own: the classifier scores those instead.
    await page.fill("#cl-labels", "weather, cooking")
    await page.fill("#cl-prompt", "Will it rain in Lisbon tomorrow?")
    await page.click("#cl-send")
    await expect(result).to_have_attribute("data-category", "weather", timeout=TIMEOUT_MS)
    await expect(rows).to_have_count(2)

    # Bad input is the server's 400, shown in the page's words.
    await page.fill("#cp-ratio", "")
    await page.evaluate("document.getElementById('cp-ratio').removeAttribute('max')")
    await page.fill("#cp-ratio", "3")
    await page.click("#cp-send")
    await expect(page.locator("#cp-error")).to_contain_text("400", timeout=TIMEOUT_MS)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile, written again here to check the page's."""
    total = buckets[-1][1]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None


def ttft_buckets(metrics: str, model: str) -> list[tuple[float, float]]:
    out = []
    for line in metrics.splitlines():
        if not line.startswith("chatfleet_time_to_first_token_seconds_bucket{"):
            continue
        labels, value = line[line.index("{") + 1 :].rsplit("} ", 1)
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs["model"] == model:
            out.append((float(pairs["le"]), float(value)))
    return sorted(out)


async def figure(page: Page, model: str, name: str) -> float | None:
    value = await page.locator(
        f"#figures-body tr[data-model='{model}'] td[data-figure={name}]"
    ).get_attribute("data-value")
    return float(value) if value else None


async def test_live_figures_per_model_after_traffic(page: Page, server: Server) -> None:
    await open_dashboard(page, server)
    for model in ("fake", "fake-reasoner", "slow", "broken"):
        await expect(page.locator(f"#figures-body tr[data-model='{model}']")).to_have_count(1)
    for _ in range(4):
        ok = await server.http.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200
    failed = await server.http.post(
        "/v1/chat/completions",
        json={"model": "broken", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert '"error"' in failed.text
    body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
    async with server.http.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.aiter_lines()
        while "content" not in await anext(lines):
            pass
        # One stream in flight, producing tokens: the page sees both from /metrics.
        slow = page.locator("#figures-body tr[data-model='slow']")
        await expect(slow.locator("td[data-figure=streams]")).to_have_text("1", timeout=TIMEOUT_MS)
        await page.wait_for_function(
            """() => Number(document.querySelector(
                "#figures-body tr[data-model='slow'] td[data-figure=tokens_per_second]"
            ).dataset.value) > 0""",
            timeout=TIMEOUT_MS,
        )
        broken = page.locator("#figures-body tr[data-model='broken']")
        await expect(broken.locator("td[data-figure=errors]")).to_have_text("1")
        await expect(
            page.locator("#figures-body tr[data-model='fake'] td[data-figure=answers]")
        ).to_have_text("4")
        await page.screenshot(path=str(SCREENSHOTS / "dashboard-figures.png"))
    await expect(slow.locator("td[data-figure=streams]")).to_have_text("0", timeout=TIMEOUT_MS)

    # The page's TTFT quantiles are PromQL's over the server's own buckets.
    metrics = (await server.http.get("/metrics")).text
    buckets = ttft_buckets(metrics, "fake")
    assert buckets[-1][1] == 4
    for q, name in ((0.5, "ttft_p50"), (0.95, "ttft_p95")):
        expected = histogram_quantile(q, buckets)
        assert expected is not None
        assert await figure(page, "fake", name) == pytest.approx(expected, rel=1e-9)


QUANTILE_CASES = [
    # 10 observations: 4 under 0.1 s, 6 more under 0.5 s.
    (0.5, [(0.1, 4), (0.5, 10), (math.inf, 10)], 0.1 + 0.4 * (5 - 4) / 6),
    (0.2, [(0.1, 4), (0.5, 10), (math.inf, 10)], 0.1 * 2 / 4),
    # Past the last finite bound: Prometheus answers that bound.
    (0.95, [(0.1, 1), (0.5, 2), (math.inf, 10)], 0.5),
    (0.5, [(0.1, 0), (math.inf, 0)], None),
]


async def test_page_reads_the_text_format_and_quantiles_as_prometheus(
    page: Page, server: Server
) -> None:
    await open_dashboard(page, server)
    text = (
        "# HELP m A metric.\n# TYPE m counter\n"
        'm_total{model="a \\"quoted\\" \\\\ name",type="output"} 12.0\n'
        "plain 3 1700000000000\n"
        'h_bucket{le="+Inf",model="b"} 4\n'
        "garbage line\n"
    )
    parsed = await page.evaluate("(t) => window.chatfleet.figures.parse(t)", text)
    assert parsed["m_total"] == [
        {"labels": {"model": 'a "quoted" \\ name', "type": "output"}, "value": 12}
    ]
    assert parsed["plain"] == [{"labels": {}, "value": 3}]
    assert parsed["h_bucket"][0]["labels"] == {"le": "+Inf", "model": "b"}
    assert "garbage" not in parsed
    for q, buckets, expected in QUANTILE_CASES:
        shown = await page.evaluate(
            "([q, b]) => window.chatfleet.figures.quantile("
            "q, b.map(([le, c]) => [le === null ? Infinity : le, c]))",
            [q, [(None if math.isinf(le) else le, c) for le, c in buckets]],
        )
        if expected is None:
            assert shown is None and histogram_quantile(q, buckets) is None
        else:
            assert shown == pytest.approx(expected)
            assert histogram_quantile(q, buckets) == pytest.approx(expected)
