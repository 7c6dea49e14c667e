"""Each reconcile is a span naming its ChatDeployment (Kopf against kmock, in-memory spans)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kopf.testing import KopfRunner
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from operator_helpers import CD_RESOURCE, RS_RESOURCE, eventually

from chatfleet.operator import OperatorSettings, Reconciler, build_registry
from chatfleet.serving import telemetry

pytestmark = pytest.mark.timeout(120)

NS = "team-t"


def test_without_an_endpoint_the_operator_does_not_trace() -> None:
    settings = OperatorSettings(otlp_endpoint="")
    assert telemetry.configure_tracing(settings.telemetry()) is None
    assert OperatorSettings(otlp_endpoint="http://c:4318").telemetry().service_name == (
        "chatfleet-operator"
    )


async def test_a_reconcile_is_a_span_with_namespace_and_name(
    kubeconfig: Path, emulator: Any, objects: Any
) -> None:
    exporter = InMemorySpanExporter()
    provider = telemetry.configure_tracing(
        OperatorSettings().telemetry(),
        component="operator",
        processor=SimpleSpanProcessor(exporter),
    )
    settings = OperatorSettings(kubeconfig=str(kubeconfig), metrics_enabled=False)
    registry = build_registry(settings, Reconciler(settings, tracer_provider=provider))
    runner = KopfRunner(["run", "--standalone", "-A"], registry=registry, timeout=60)
    runner.__enter__()
    try:
        body = {
            "apiVersion": "chatfleet.dev/v1alpha1",
            "kind": "ChatDeployment",
            "metadata": {"name": "traced", "namespace": NS},
            "spec": {"serving": {"models": [{"name": "fake", "engine": "fake"}]}},
        }
        async with (
            aiohttp.ClientSession(base_url=str(emulator.url)) as session,
            session.post(
                f"/apis/chatfleet.dev/v1alpha1/namespaces/{NS}/chatdeployments", json=body
            ) as r,
        ):
            assert r.status < 300, await r.text()
        await eventually(lambda: objects(RS_RESOURCE, NS, "traced"))
        await eventually(
            lambda: any(s.name == "reconcile ChatDeployment" for s in exporter.get_finished_spans())
        )
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        assert provider is not None
        provider.shutdown()
    assert objects(CD_RESOURCE, NS, "traced") is not None
    span = next(s for s in exporter.get_finished_spans() if s.name == "reconcile ChatDeployment")
    assert span.attributes is not None
    assert span.attributes["k8s.namespace.name"] == NS
    assert span.attributes["chatfleet.chatdeployment.name"] == "traced"
    assert span.attributes["chatfleet.reconcile.trigger"] == "create"
    assert span.resource.attributes["service.name"] == "chatfleet-operator"
    assert span.resource.attributes["chatfleet.component"] == "operator"
