"""The ChatDeployments-by-Ready gauge: the map behind it, and Kopf against kmock keeping it."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from operator_helpers import CD_RESOURCE, RS_RESOURCE, eventually, ready_rayservice_status
from test_operator_kopf import NS, Api, chat_deployment, operator

from chatfleet.operator._metrics import READY_STATES, OperatorMetrics

pytestmark = pytest.mark.timeout(120)

GAUGE = "chatfleet_operator_chatdeployments"


def by_ready(metrics: OperatorMetrics) -> dict[str, float | None]:
    return {s: metrics.registry.get_sample_value(GAUGE, {"ready": s}) for s in READY_STATES}


def test_every_ready_state_is_a_series_from_the_start() -> None:
    assert by_ready(OperatorMetrics()) == {"True": 0, "False": 0, "Unknown": 0}


def test_the_gauge_counts_each_chatdeployment_once_by_its_latest_status() -> None:
    metrics = OperatorMetrics()
    metrics.track_ready("team-a", "demo", "False")
    metrics.track_ready("team-a", "other", "False")
    metrics.track_ready("team-b", "demo", "Unknown")
    assert by_ready(metrics) == {"True": 0, "False": 2, "Unknown": 1}
    metrics.track_ready("team-a", "demo", "True")
    metrics.track_ready("team-a", "demo", "True")
    metrics.track_ready("team-b", "demo", "Maybe")  # not a condition status: Unknown
    assert by_ready(metrics) == {"True": 1, "False": 1, "Unknown": 1}
    metrics.forget("team-a", "demo")
    metrics.forget("team-a", "never-seen")
    assert by_ready(metrics) == {"True": 0, "False": 1, "Unknown": 1}


@pytest.fixture
async def api(emulator: Any) -> Any:
    async with aiohttp.ClientSession(base_url=str(emulator.url)) as session:
        yield Api(session)


async def test_gauge_follows_a_chatdeployment_from_creation_to_deletion(kubeconfig, api, objects):
    async with operator(kubeconfig) as rec:
        assert by_ready(rec.metrics) == {"True": 0, "False": 0, "Unknown": 0}
        await api.create(CD_RESOURCE, chat_deployment())
        # Created: the RayService does not run yet, so Ready is False.
        await eventually(lambda: by_ready(rec.metrics)["False"] == 1)
        assert by_ready(rec.metrics) == {"True": 0, "False": 1, "Unknown": 0}
        # KubeRay reports the service ready: the mirrored status moves it to True.
        rs = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        await api.patch(
            RS_RESOURCE,
            "demo",
            {"status": ready_rayservice_status(rs["metadata"]["generation"])},
            sub="status",
        )
        await eventually(lambda: by_ready(rec.metrics)["True"] == 1)
        assert by_ready(rec.metrics) == {"True": 1, "False": 0, "Unknown": 0}
        # A second one, invalid: Ready is False.
        await api.create(CD_RESOURCE, chat_deployment("broken", serving={"models": []}))
        await eventually(lambda: by_ready(rec.metrics)["False"] == 1)
        assert by_ready(rec.metrics) == {"True": 1, "False": 1, "Unknown": 0}
        # Deleted: no longer counted.
        await api.delete(CD_RESOURCE, "demo")
        await eventually(lambda: objects(CD_RESOURCE, NS, "demo") is None)
        await eventually(lambda: by_ready(rec.metrics)["True"] == 0)
        await api.delete(CD_RESOURCE, "broken")
        await eventually(lambda: objects(CD_RESOURCE, NS, "broken") is None)
        await eventually(lambda: by_ready(rec.metrics)["False"] == 0)
        assert by_ready(rec.metrics) == {"True": 0, "False": 0, "Unknown": 0}
        # ... and Prometheus sees the three zero series.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{rec.metrics_port}/metrics") as r,
        ):
            text = await r.text()
    for state in READY_STATES:
        assert f'{GAUGE}{{ready="{state}"}} 0.0' in text


async def test_a_restarted_operator_counts_what_it_resumes(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(
            lambda: (
                (objects(CD_RESOURCE, NS, "demo").get("status") or {}).get("observedGeneration")
                == 1
            )
        )
    async with operator(kubeconfig) as rec:
        await eventually(lambda: by_ready(rec.metrics)["False"] == 1)
