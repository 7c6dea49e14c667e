"""Kopf end to end: the operator against kmock's Kubernetes emulator over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kopf.testing import KopfRunner
from operator_helpers import (
    CD_RESOURCE,
    RS_RESOURCE,
    SM_RESOURCE,
    eventually,
    ready_rayservice_status,
)

from chatfleet.operator import OperatorSettings, Reconciler, build_registry

pytestmark = pytest.mark.timeout(120)


NS = "team-a"


def chat_deployment(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "chatfleet.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec or {"serving": {"models": [{"name": "fake", "engine": "fake"}]}},
    }


@contextlib.asynccontextmanager
async def operator(
    kubeconfig: Path,
    peering: str | None = None,
    priority: int = 0,
    namespaces: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Reconciler]:
    """Kopf in a thread (KopfRunner); kmock serves on this test's event loop."""
    settings = OperatorSettings(
        kubeconfig=str(kubeconfig),
        metrics_port=0,
        metrics_host="127.0.0.1",
        **overrides,
    )
    reconciler = Reconciler(settings)
    registry = build_registry(settings, reconciler)
    mode = ["--peering", peering, "--priority", str(priority)] if peering else ["--standalone"]
    scope = [arg for ns in namespaces for arg in ("-n", ns)] or ["-A"]
    runner = KopfRunner(["run", *mode, *scope, "--verbose"], registry=registry, timeout=60)
    runner.__enter__()
    try:
        yield reconciler
    finally:
        # Stopping joins Kopf's thread, whose handlers may still be calling kmock:
        # join it off the loop so kmock keeps answering.
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


class Api:
    """A plain HTTP client of the emulator, standing in for kubectl and KubeRay."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.s = session

    @staticmethod
    def _path(resource: str, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{base}/namespaces/{NS}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    async def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        async with self.s.post(self._path(resource), json=obj) as r:
            assert r.status < 300, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async def patch(
        self, resource: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.s.patch(self._path(resource, name, sub), json=patch, headers=headers) as r:
            assert r.status < 300, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async def delete(self, resource: str, name: str) -> None:
        async with self.s.delete(self._path(resource, name)) as r:
            assert r.status < 300, await r.text()


@pytest.fixture
async def api(emulator: Any) -> Any:
    async with aiohttp.ClientSession(base_url=str(emulator.url)) as session:
        yield Api(session)


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    if not obj:
        return None
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None
    )


async def test_create_renders_owned_objects_and_status(kubeconfig, api, objects):
    async with operator(kubeconfig):
        cd = await api.create(CD_RESOURCE, chat_deployment())
        rs = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        svc = await eventually(lambda: objects("v1/services", NS, "demo-chat"))
        secret = await eventually(lambda: objects("v1/secrets", NS, "demo-jwt"))
        status_cd = await eventually(
            lambda: (
                (o := objects(CD_RESOURCE, NS, "demo"))
                and o.get("status", {}).get("observedGeneration") == 1
                and o
            )
        )

    uid = cd["metadata"]["uid"]
    for obj in (rs, svc, secret):
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [
            ("ChatDeployment", uid, True)
        ]
    assert "chatfleet.serving.app:build_app" in rs["spec"]["serveConfigV2"]
    assert len(base64.b64decode(secret["data"]["signing-key"])) >= 48
    status = status_cd["status"]
    assert status["endpoint"] == f"http://demo-chat.{NS}.svc:8000"
    assert status["models"] == "fake"
    assert condition(status_cd, "Ready")["status"] == "False"
    assert condition(status_cd, "Progressing")["status"] == "True"
    assert condition(status_cd, "InvalidSpec")["status"] == "False"


async def test_update_changes_rayservice_but_keeps_secret(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        rs1 = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        key1 = (await eventually(lambda: objects("v1/secrets", NS, "demo-jwt")))["data"]
        await eventually(
            lambda: (
                (objects(CD_RESOURCE, NS, "demo").get("status") or {}).get("observedGeneration")
                == 1
            )
        )
        await api.patch(
            CD_RESOURCE,
            "demo",
            {
                "spec": {
                    "serving": {
                        "models": [
                            {"name": "fake", "engine": "fake"},
                            {"name": "fast", "engine": "fake", "fake": {"tokens_per_second": 500}},
                        ]
                    }
                }
            },
        )
        rs2 = await eventually(
            lambda: (
                (o := objects(RS_RESOURCE, NS, "demo"))
                and "fast" in o["spec"]["serveConfigV2"]
                and o
            )
        )
        cd = await eventually(
            lambda: (
                (o := objects(CD_RESOURCE, NS, "demo"))
                and (o.get("status") or {}).get("observedGeneration") == 2
                and o
            )
        )
    assert rs1["spec"]["serveConfigV2"] != rs2["spec"]["serveConfigV2"]
    assert objects("v1/secrets", NS, "demo-jwt")["data"] == key1
    assert cd["status"]["models"] == "fake,fast"


async def test_restart_keeps_secret_and_resumes(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        key1 = (await eventually(lambda: objects("v1/secrets", NS, "demo-jwt")))["data"]
    # A second operator process (a restart) resumes the object and keeps the key.
    async with operator(kubeconfig) as rec:
        await eventually(lambda: rec.metrics.reconciles.labels("resume", "applied")._value.get())
    assert objects("v1/secrets", NS, "demo-jwt")["data"] == key1


async def test_rayservice_status_is_mirrored(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(
            lambda: (
                (objects(CD_RESOURCE, NS, "demo").get("status") or {}).get("observedGeneration")
                == 1
            )
        )
        rs = objects(RS_RESOURCE, NS, "demo")
        # KubeRay reports the service healthy.
        await api.patch(
            RS_RESOURCE,
            "demo",
            {"status": ready_rayservice_status(rs["metadata"]["generation"])},
            sub="status",
        )
        ready = await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "Ready"))
                and c["status"] == "True"
            )
        )
        assert ready
        cd = objects(CD_RESOURCE, NS, "demo")
        assert condition(cd, "Progressing")["status"] == "False"
        assert cd["status"]["serviceStatus"] == "Running"
        # Then an application fails.
        await api.patch(
            RS_RESOURCE,
            "demo",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "Unhealthy",
                            "message": "replica crashed",
                            "lastTransitionTime": "2026-01-01T00:01:00Z",
                        }
                    ],
                    "activeServiceStatus": {
                        "applicationStatuses": {
                            "chatfleet": {
                                "status": "DEPLOY_FAILED",
                                "message": "ImportError: no module",
                            }
                        }
                    },
                }
            },
            sub="status",
        )
        degraded = await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "Degraded"))
                and c["status"] == "True"
                and c
            )
        )
    assert "DEPLOY_FAILED" in degraded["message"]
    assert condition(objects(CD_RESOURCE, NS, "demo"), "Ready")["status"] == "False"


def events_for(emulator: Any, name: str) -> list[dict[str, Any]]:
    import kmock

    res = kmock.resource("v1/events")
    return [
        obj.raw
        for (r, _ns, _n), obj in emulator.objects.items()
        if r == res and not obj.deleted and obj.raw.get("involvedObject", {}).get("name") == name
    ]


async def test_invalid_spec_is_reported_not_retried(kubeconfig, api, objects, emulator):
    bad = chat_deployment(
        serving={
            "models": [
                {"name": "big", "engine": "vllm"},  # no vllm block
            ]
        }
    )
    async with operator(kubeconfig) as rec:
        await api.create(CD_RESOURCE, bad)
        cond = await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "InvalidSpec"))
                and c["status"] == "True"
                and c
            )
        )
        await eventually(lambda: events_for(emulator, "demo"))
        await asyncio.sleep(1.0)  # no retries: a permanent error
        assert rec.metrics.reconciles.labels("create", "invalid")._value.get() == 1
        assert objects(RS_RESOURCE, NS, "demo") is None
        # Fixing the spec recovers.
        await api.patch(
            CD_RESOURCE,
            "demo",
            {
                "spec": {
                    "serving": {
                        "models": [
                            {
                                "name": "big",
                                "engine": "vllm",
                                "vllm": {"model": "Qwen/Qwen3-8B"},
                                "num_gpus": 1,
                            }
                        ]
                    },
                    "cluster": {"gpuWorkers": {"gpusPerPod": 1}},
                }
            },
        )
        await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        fixed = await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "InvalidSpec"))
                and c["status"] == "False"
            )
        )
    assert "spec.serving.models[0]" in cond["message"]
    assert fixed
    event = events_for(emulator, "demo")[0]
    assert event["reason"] == "InvalidSpec"
    assert event["type"] == "Warning"


async def test_missing_secret_reference_is_invalid_until_created(kubeconfig, api, objects):
    spec = {
        "serving": {"models": [{"name": "fake", "engine": "fake"}]},
        "cluster": {"databaseSecretRef": {"name": "pg", "key": "url"}},
    }
    async with operator(kubeconfig, missing_secret_retry_s=0.5):
        await api.create(CD_RESOURCE, chat_deployment(**spec))
        cond = await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "InvalidSpec"))
                and c["status"] == "True"
                and c
            )
        )
        assert "spec.cluster.databaseSecretRef" in cond["message"]
        await api.create(
            "v1/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "pg", "namespace": NS},
                "data": {"url": base64.b64encode(b"postgresql://x").decode()},
            },
        )
        rs = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"), within=15)
    env = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert {
        "name": "CHATFLEET_DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "pg", "key": "url"}},
    } in env


async def test_delete_is_left_to_the_garbage_collector(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(lambda: objects("v1/secrets", NS, "demo-jwt"))
        await eventually(lambda: objects("v1/services", NS, "demo-chat"))
        rs = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        cd = objects(CD_RESOURCE, NS, "demo")
        # Owned, so the garbage collector deletes them; no finalizer holds the owner.
        assert rs["metadata"]["ownerReferences"][0]["uid"] == cd["metadata"]["uid"]
        assert not cd["metadata"].get("finalizers")
        await api.delete(CD_RESOURCE, "demo")
        await eventually(lambda: objects(CD_RESOURCE, NS, "demo") is None)
        await eventually(lambda: objects(RS_RESOURCE, NS, "demo") is None)
    assert objects("v1/services", NS, "demo-chat") is None
    assert objects("v1/secrets", NS, "demo-jwt") is None


@pytest.mark.service_monitors
async def test_drift_is_repaired_and_service_monitor_created(kubeconfig, api, objects):
    async with operator(kubeconfig) as rec:
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(lambda: objects(SM_RESOURCE, NS, "demo-chat"))
        svc = await eventually(lambda: objects("v1/services", NS, "demo-chat"))
        await api.delete("v1/services", "demo-chat")
        # Someone deleted it: its watch event makes the operator create it again.
        await eventually(
            lambda: (
                (again := objects("v1/services", NS, "demo-chat"))
                and again["metadata"]["uid"] != svc["metadata"]["uid"]
            )
        )
        # Someone edited the RayService: our fields come back, theirs stay.
        rs = objects(RS_RESOURCE, NS, "demo")
        config = rs["spec"]["serveConfigV2"]
        await api.patch(
            RS_RESOURCE,
            "demo",
            {"metadata": {"annotations": {"theirs": "x"}}, "spec": {"serveConfigV2": "edited"}},
        )
        repaired = await eventually(
            lambda: (
                (now := objects(RS_RESOURCE, NS, "demo"))
                and now["spec"]["serveConfigV2"] == config
                and now
            )
        )
        assert repaired["metadata"]["annotations"]["theirs"] == "x"
        # Operator metrics are served over HTTP.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{rec.metrics_port}/metrics") as r,
        ):
            text = await r.text()
    assert 'chatfleet_operator_reconciles_total{result="applied",trigger="drift"} 2.0' in text
    assert "chatfleet_operator_reconcile_duration_seconds_bucket" in text


def start_cli(kubeconfig: Path, log: Path) -> subprocess.Popen[bytes]:
    """The entry point as the container runs it: ``python -m chatfleet.operator run``."""
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "CHATFLEET_OPERATOR_KUBECONFIG": str(kubeconfig),
        "CHATFLEET_OPERATOR_METRICS_PORT": "0",
        "CHATFLEET_OPERATOR_METRICS_HOST": "127.0.0.1",
    }
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "chatfleet.operator", "run", "--liveness", ""],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_cli_runs_the_operator_and_stops_on_sigterm(kubeconfig, api, objects, tmp_path):
    log = tmp_path / "operator.log"
    proc = start_cli(kubeconfig, log)
    try:
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(lambda: objects(RS_RESOURCE, NS, "demo"), within=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log.read_text()[-3000:]


@pytest.mark.service_monitors
async def test_operator_only_uses_what_the_chart_grants(kubeconfig, api, objects, emulator):
    # A whole lifecycle, audited like RBAC would see it, against the chart's ClusterRole.
    from test_operator_chart import by_kind, render, rules_of

    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(lambda: objects(SM_RESOURCE, NS, "demo-chat"))
        rs = await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        await api.patch(RS_RESOURCE, "demo", {"status": {"serviceStatus": "Running"}}, sub="status")
        await api.patch(CD_RESOURCE, "demo", {"spec": {"serving": {"models": []}}})  # invalid
        await eventually(
            lambda: (
                (c := condition(objects(CD_RESOURCE, NS, "demo"), "InvalidSpec"))
                and c["status"] == "True"
            )
        )
        await api.delete("v1/services", "demo-chat")  # drift, repaired from the watch
        await asyncio.sleep(1.0)
        await api.delete(CD_RESOURCE, "demo")
        await eventually(lambda: objects(CD_RESOURCE, NS, "demo") is None)
    assert rs
    # Drop what this test itself did as "kubectl" and "KubeRay".
    ours = {
        ("create", "chatfleet.dev", "chatdeployments"),
        ("delete", "chatfleet.dev", "chatdeployments"),
        ("delete", "", "services"),
        ("patch", "ray.io", "rayservices/status"),
    }
    used = emulator.audit - ours
    (role,) = by_kind(render({}), "ClusterRole")
    granted = rules_of(role)
    missing = {(verb, group, res) for verb, group, res in used if (group, res, verb) not in granted}
    assert not missing, f"the operator needs RBAC the chart does not grant: {missing}"
    # ... and nothing it does not use, but "create" for server-side apply, which creates
    # what is absent on a real API server (the emulator records that as a patch), and
    # the finalizers subresource a real API server checks for blockOwnerDeletion
    # (tests/cluster shows both are needed).
    unused = {(g, r, v) for g, r, v in granted if (v, g, r) not in used}
    assert unused <= {
        ("ray.io", "rayservices", "create"),
        ("", "services", "create"),
        ("monitoring.coreos.com", "servicemonitors", "create"),
        ("chatfleet.dev", "chatdeployments/finalizers", "update"),
    }


async def test_delete_while_the_operator_is_down_needs_no_operator(kubeconfig, api, objects):
    async with operator(kubeconfig):
        await api.create(CD_RESOURCE, chat_deployment())
        await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        await eventually(lambda: objects("v1/secrets", NS, "demo-jwt"))
    await api.delete(CD_RESOURCE, "demo")
    # No finalizer: the object and (through the garbage collector) its children go at
    # once, with the operator stopped or uninstalled.
    await eventually(lambda: objects(CD_RESOURCE, NS, "demo") is None)
    await eventually(lambda: objects(RS_RESOURCE, NS, "demo") is None)
    assert objects("v1/secrets", NS, "demo-jwt") is None
    assert objects("v1/services", NS, "demo-chat") is None


async def test_the_finalizer_of_earlier_versions_is_removed(kubeconfig, api, objects):
    legacy = chat_deployment()
    legacy["metadata"]["finalizers"] = ["chatfleet.dev/finalizer"]
    await api.create(CD_RESOURCE, legacy)
    async with operator(kubeconfig):
        await eventually(lambda: objects(RS_RESOURCE, NS, "demo"))
        await eventually(lambda: not objects(CD_RESOURCE, NS, "demo")["metadata"].get("finalizers"))
