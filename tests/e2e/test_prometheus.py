"""The dashboards and alert rules against a real Prometheus scraping real chatfleet processes.

Debian's ``prometheus`` (2.42) runs on 127.0.0.1 and scrapes, every second, a
``chatfleet serve`` process (its own Ray, fake engines, the embedded MiniLM
classifier and an LLMLingua-2 compressor on a tiny random BERT) and the operator
(Kopf with chatfleet's handlers against kmock's Kubernetes emulator). Two rounds
of traffic, with a scrape between them, make every counter and histogram move
between two samples, so ``rate()`` sees it: streamed and non-streamed chats on a
fast, a slow (3 s to the first token) and a broken model, bad requests, routed
``model: "auto"`` requests (one falling back), classify, compress, a WebSocket
held open; valid, invalid and API-failing ChatDeployments, and a RayService that
"KubeRay" reports Ready. Then every PromQL expression of every dashboard panel
and every alert rule goes through Prometheus's HTTP API and must parse and return
series with a value (alert expressions return series only while the alert would
fire: the traffic is built to make each one fire). ``promtool check rules``
checks the rule file. Last, the series scraped through Ray's metrics port equal the
ingress replica's own ``/metrics``.

Without ``prometheus``/``promtool`` the tests skip, except in CI (``$CI`` set),
where they fail: ``scripts/test`` installs them with apt-get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import httpx
import kmock
import pytest
import yaml
from tests.fakes.ports import free_port
from tests.fakes.prometheus import PrometheusServer, require_binary
from tests.fakes.serve_process import ServeProcess, serve_processes
from tests.fakes.tiny_models import build_tiny_llmlingua2
from websockets.sync.client import ClientConnection, connect

from chatfleet.operator import METRIC_RELABELINGS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "chatfleet" / "dashboards"
ALERT_RULES = ROOT / "charts" / "chatfleet" / "rules" / "chatfleet-alerts.yaml"

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from kmock_emulator import StampingEmulator  # noqa: E402
from operator_helpers import (  # noqa: E402
    CD_RESOURCE,
    RS_RESOURCE,
    declare_resources,
    ready_rayservice_status,
    write_kubeconfig,
)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,  # MiniLM and a tiny BERT load in the Ray replicas
    pytest.mark.timeout(420),
    # kmock 0.8 loads its bundled resource list with a legacy importlib.resources call.
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

NAMESPACE = "team-a"  # of the ChatDeployments in the emulator
TARGET_NAMESPACE = "chatfleet"  # the `namespace` label of the scraped series, as in a cluster
SERVING_JOB = "chatfleet"
OPERATOR_JOB = "chatfleet-operator"
EVALUATION_DEADLINE_S = 60.0
# Grafana's built-in variables, as Grafana would fill them for a 5-minute view.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}


def metric_relabel_configs() -> list[dict[str, Any]]:
    """The operator's ServiceMonitor ``metricRelabelings``, in prometheus.yml's spelling."""
    snake = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{snake.get(k, k): v for k, v in rule.items()} for rule in METRIC_RELABELINGS]


def scrape_config(serving_target: str, operator_target: str) -> dict[str, Any]:
    """Prometheus's configuration: both chatfleet jobs on loopback, scraped every second.

    The serving job scrapes what a cluster scrapes: Ray's metrics port, where every
    replica's ``ray_chatfleet_*`` series are, renamed as the operator's ServiceMonitor
    renames them (not the API's ``/metrics``, which is one replica's).
    """

    def job(name: str, target: str, **extra: Any) -> dict[str, Any]:
        return {
            "job_name": name,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [target], "labels": {"namespace": TARGET_NAMESPACE}}],
            **extra,
        }

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            job(SERVING_JOB, serving_target, metric_relabel_configs=metric_relabel_configs()),
            job(OPERATOR_JOB, operator_target),
        ],
    }


# --- the serving process -------------------------------------------------------------------

LONG_TEXT = (
    "The city council met on Tuesday evening to debate a proposal to expand the network of"
    " protected bike lanes across the downtown area. The proposal would add twelve kilometres"
    " of separated lanes along the main commuter corridors.\n\n"
    "Supporters pointed to figures showing that cycling to work had risen by nearly forty"
    " percent over three years, while serious collisions involving cyclists had also increased."
    "\n\nOpponents, mostly shop owners on Mill Road, argued that removing on-street parking"
    " would cost them customers. After four hours the council voted nine to four in favour."
)


def serving_config(compressor_model: Path) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "fast",
                "engine": "fake",
                "fake": {"reply_tokens": 16, "tokens_per_second": 400},
            },
            {
                "name": "slow",
                "engine": "fake",
                # Over the 2.5 s of the time-to-first-token SLO: its burn alert fires.
                "fake": {"reply_tokens": 8, "tokens_per_second": 100, "time_to_first_token_s": 3},
            },
            # Fails before its first token: 502s (the error-ratio alert) and a fallback.
            {"name": "broken", "engine": "fake", "fake": {"fail_after_tokens": 0}},
        ],
        "default_model": "fast",
        "classifier": {"backend": "embedding", "max_batch_size": 8},
        "compressor": {
            "method": "llmlingua2",
            "model": str(compressor_model),
            "min_tokens": 20,
            "num_cpus": 0.1,
        },
        "routing": {
            "routes": [
                {"category": "coding", "model": "fast"},
                {"category": "maths", "model": "slow"},
                {"category": "translation", "model": "broken", "fallbacks": ["fast"]},
            ],
            "confidence_threshold": 0.3,
        },
        # The WebSocket stays open through the evaluation without answering pings.
        "websocket": {"ping_interval_s": 3600},
        # One ingress replica (the default is two): the tests compare its own /metrics
        # with what Prometheus scraped from Ray's agent for the whole application.
        "ingress": {"num_replicas": 1},
    }


@dataclass
class Serving:
    run: ServeProcess
    target: str  # Ray's metrics port, which Prometheus scrapes

    @property
    def url(self) -> str:
        return self.run.url


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """``chatfleet serve`` started (not waited for: Prometheus starts meanwhile)."""
    root = tmp_path_factory.mktemp("serve")
    config = root / "chatfleet.yaml"
    config.write_text(yaml.safe_dump(serving_config(build_tiny_llmlingua2(root))))
    metrics_port = free_port()
    # Ray's metrics agent exports what replicas recorded every 10 s by default.
    with serve_processes(root, {"RAY_metrics_report_interval_ms": "1000"}) as start:
        run = start("--config", str(config), "--no-auth", "--metrics-port", str(metrics_port))
        try:
            yield Serving(run, f"127.0.0.1:{metrics_port}")
        finally:
            run.stop()


# --- the operator against kmock ------------------------------------------------------------

FAILING_PREFIX = "api-error"


@attrs.define(kw_only=True)
class TroubledApiServer(StampingEmulator):
    """The emulator, answering 500 to every write of RayServices named ``api-error*``.

    Reconciles of their ChatDeployments end in ``result="error"`` (retried every 2 s),
    the case the ReconcileFailures alert is about.
    """

    async def _handle(self, request: Any) -> Any:
        resource = request.resource
        if (
            resource is not None
            and resource.plural == "rayservices"
            and (request.name or "").startswith(FAILING_PREFIX)
            and str(getattr(request.method, "value", request.method)).upper() != "GET"
        ):
            self._forget(request)
            raise kmock.KubernetesError(status=500, reason="InternalError", message="injected")
        return await super()._handle(request)


class KubeApi:
    """A plain HTTP client of the emulator, standing in for kubectl and KubeRay."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    @staticmethod
    def path(resource: str, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return "/".join(p for p in (f"{base}/namespaces/{NAMESPACE}/{plural}", name, sub) if p)

    def create(self, resource: str, obj: dict[str, Any]) -> None:
        response = self.http.post(self.path(resource), json=obj)
        assert response.status_code < 300, response.text

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        response = self.http.get(self.path(resource, name))
        return response.json() if response.status_code == 200 else None

    def patch_status(self, resource: str, name: str, status: dict[str, Any]) -> None:
        response = self.http.patch(
            self.path(resource, name, "status"),
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status_code < 300, response.text


def chat_deployment(name: str, serving: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "chatfleet.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"serving": serving},
    }


VALID = {"models": [{"name": "fake", "engine": "fake"}]}
INVALID = {"models": [{"name": "big", "engine": "vllm"}]}  # no vllm block


class OperatorUnderTest:
    """Kopf (in `KopfRunner`'s thread) against the emulator (on an event loop of its own)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self._runner: Any = None
        self.reconciler: Any = None
        self.api: KubeApi | None = None

    def start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kubernetes
        from kopf.testing import KopfRunner

        from chatfleet.operator import OperatorSettings, Reconciler, build_registry

        async def serve() -> str:
            emulator = await self._stack.enter_async_context(TroubledApiServer())
            await self._stack.enter_async_context(kmock.Server(emulator))
            declare_resources(emulator)
            return str(emulator.url).rstrip("/")

        self._thread.start()
        url = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=30)
        self.api = KubeApi(url)
        kubeconfig = self.root / "kubeconfig"
        write_kubeconfig(kubeconfig, url)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        # The kubernetes client read $KUBECONFIG once at import; Kopf logs in through it.
        monkeypatch.setattr(
            kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
        )
        settings = OperatorSettings(
            kubeconfig=str(kubeconfig),
            metrics_host="127.0.0.1",
            metrics_port=0,
            drift_interval_s=5.0,  # timer reconciles too
            post_events=False,  # kmock gives Kopf's Events clashing names: 409s, log noise
        )
        self.reconciler = Reconciler(settings)
        registry = build_registry(settings, self.reconciler)
        self._runner = KopfRunner(
            ["run", "--standalone", "-A", "--verbose"], registry=registry, timeout=60
        )
        self._runner.__enter__()
        wait_for(lambda: self.reconciler.metrics_port, "the operator's metrics server", 30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.reconciler.metrics_port}"

    def counted(self, name: str, **labels: str) -> float:
        value = self.reconciler.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()
        if self.api is not None:
            self.api.http.close()
        if self._runner is not None:
            assert self._runner.exception is None, self._runner.output


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorUnderTest]:
    under_test = OperatorUnderTest(tmp_path_factory.mktemp("operator"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            under_test.start(monkeypatch)
            yield under_test
        finally:
            under_test.stop()


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# --- Prometheus and the traffic --------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str,  # first: without it, neither Ray nor the operator starts
    serving: Serving,
    operator: OperatorUnderTest,
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(prometheus_binary, scrape_config(serving.target, operator.target))
    try:
        server.start()
        serving.run.wait_ready(timeout_s=240)
        server.wait_targets_up({SERVING_JOB, OPERATOR_JOB}, timeout_s=60)
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Call:
    what: str
    path: str
    body: dict[str, Any]
    status: int


def chat(model: str, content: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def serving_calls() -> list[Call]:
    chats = "/v1/chat/completions"
    return [
        Call("fast", chats, chat("fast", "Hello there"), 200),
        Call("fast, streamed", chats, chat("fast", "Hello again", stream=True), 200),
        Call("slow", chats, chat("slow", "Take your time"), 200),
        Call("slow, streamed", chats, chat("slow", "Take your time", stream=True), 200),
        # The /metrics scrapes (one a second here) count as requests too: enough 5xx
        # that they stay above the alert's 5% over the whole run.
        *(
            Call(f"broken #{n}", chats, chat("broken", "Hi", stream=n % 2 == 1), 502)
            for n in range(8)
        ),
        Call(
            "auto: coding",
            chats,
            chat("auto", "Write a Python function that reverses a linked list."),
            200,
        ),
        Call("auto: maths (slow)", chats, chat("auto", "What is the integral of x squared?"), 200),
        Call(
            "auto: translation (broken, falls back)",
            chats,
            chat("auto", "Translate 'good morning' into French.", stream=True),
            200,
        ),
        Call("auto: chit-chat (default)", chats, chat("auto", "Hey, how is your day?"), 200),
        Call(
            "auto: long prompt (compressed)",
            chats,
            chat("auto", f"{LONG_TEXT}\n\nSummarise this report in two sentences."),
            200,
        ),
        Call("no messages", chats, {"model": "fast"}, 400),
        Call("unknown model", chats, chat("gpt-17", "Hi"), 404),
        Call("classify", "/api/classify", {"prompt": "Solve 3x + 5 = 20 for x"}, 200),
        Call(
            "compress",
            "/api/compress",
            {"text": LONG_TEXT, "question": "How did the council vote?", "ratio": 0.5},
            200,
        ),
        Call("generate", "/api/generate", {"model": "fast", "prompt": "Hello"}, 200),
    ]


def serving_round(url: str, ws: ClientConnection) -> None:
    def send(call: Call) -> str | None:
        response = httpx.post(f"{url}{call.path}", json=call.body, timeout=60)
        if response.status_code != call.status:
            return (
                f"{call.what}: HTTP {response.status_code}, expected {call.status}: {response.text}"
            )
        if call.path == "/api/compress" and response.json()["skipped"]:
            return f"{call.what}: not compressed: {response.text}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(send, serving_calls()) if p]
    ws.send(json.dumps({"type": "chat", "content": "Hello over a WebSocket", "model": "fast"}))
    while (frame := json.loads(ws.recv(timeout=30)))["type"] == "token":
        pass
    if frame["type"] != "complete":
        problems.append(f"WebSocket chat: {frame}")
    assert not problems, "\n".join(problems)


def operator_round(operator: OperatorUnderTest, n: int) -> None:
    api = operator.api
    assert api is not None
    api.create(CD_RESOURCE, chat_deployment(f"demo-{n}", VALID))
    api.create(CD_RESOURCE, chat_deployment(f"invalid-{n}", INVALID))
    if n == 1:
        api.create(CD_RESOURCE, chat_deployment(f"{FAILING_PREFIX}-1", VALID))
    rayservice = wait_for(lambda: api.get(RS_RESOURCE, f"demo-{n}"), f"RayService demo-{n}")
    # KubeRay reports the service Ready; the operator mirrors it into the ChatDeployment.
    api.patch_status(
        RS_RESOURCE,
        f"demo-{n}",
        ready_rayservice_status(rayservice["metadata"]["generation"]),
    )
    reconciles = "chatfleet_operator_reconciles_total"
    wait_for(
        lambda: (
            operator.counted(reconciles, trigger="create", result="applied") >= n
            and operator.counted(reconciles, trigger="create", result="invalid") >= n
            and operator.counted(reconciles, trigger="create", result="error") >= n
            and operator.counted("chatfleet_operator_status_updates_total") >= n
        ),
        f"the operator's reconciles of round {n}",
    )


@pytest.fixture(scope="module")
def traffic(
    serving: Serving, operator: OperatorUnderTest, prometheus: PrometheusServer
) -> Iterator[None]:
    """Two rounds of traffic with a scrape between them, a WebSocket open throughout."""
    with connect(serving.url.replace("http://", "ws://") + "/ws/chat") as ws:
        ack = json.loads(ws.recv(timeout=30))
        assert ack["type"] == "connection_ack", ack
        for n in (1, 2):
            serving_round(serving.url, ws)
            operator_round(operator, n)
            # Series born in this round got their first sample; the next round moves them.
            prometheus.wait_scraped_after(time.time())
        yield


# --- the expressions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    where: str
    expr: str
    promql: str | None  # None: it can't be sent (why is in `problem`)
    problem: str = ""


_GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[(\w+)\]\]")


def grafana_to_promql(expr: str, variables: set[str]) -> tuple[str | None, str]:
    """Fill Grafana's variables in: built-ins as Grafana would, the dashboard's own as "All"."""
    unknown: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in variables:
            return ".*"  # a multi-value variable set to All, inside =~"..."
        unknown.append(name)
        return match.group(0)

    promql = _GRAFANA_VARIABLE.sub(fill, expr)
    if unknown:
        return None, f"unknown Grafana variable(s): {', '.join(sorted(set(unknown)))}"
    return promql, ""


def _panel_expressions(
    panels: list[dict[str, Any]], source: str, variables: set[str]
) -> Iterator[Expression]:
    for panel in panels:
        for target in panel.get("targets") or []:
            if "expr" in target:
                where = f"{source}: panel {panel.get('title')!r} target {target.get('refId', '?')}"
                promql, problem = grafana_to_promql(target["expr"], variables)
                yield Expression(where, target["expr"], promql, problem)
        yield from _panel_expressions(panel.get("panels") or [], source, variables)  # rows


def dashboard_expressions() -> list[Expression]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    found: list[Expression] = []
    for path in files:
        dashboard = json.loads(path.read_text())
        variables = {v["name"] for v in (dashboard.get("templating") or {}).get("list", [])}
        found += _panel_expressions(dashboard.get("panels") or [], path.name, variables)
    return found


def rule_expressions() -> list[Expression]:
    found = []
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]:
        for rule in group.get("rules") or []:
            kind = "alert" if "alert" in rule else "record"
            where = f"{ALERT_RULES.name}: group {group['name']!r} {kind} {rule[kind]!r}"
            found.append(Expression(where, rule["expr"], rule["expr"]))
    return found


def _has_value(data: dict[str, Any]) -> bool:
    """Whether an instant query's answer has a sample that is a number (not NaN)."""
    result = data.get("result")
    if data.get("resultType") == "scalar":
        samples = [result]
    else:
        samples = [s.get("value") or (s.get("values") or [None])[-1] for s in result or []]
    return any(s and not math.isnan(float(s[1])) for s in samples)


def evaluate(prometheus: PrometheusServer, expressions: list[Expression]) -> list[str]:
    """Query each until it returns a series with a value; the failures, explained."""
    last: dict[Expression, str] = {e: e.problem for e in expressions if e.promql is None}
    pending = [e for e in expressions if e.promql is not None]
    deadline = time.monotonic() + EVALUATION_DEADLINE_S
    while pending:
        still = []
        for e in pending:
            assert e.promql is not None
            answer = prometheus.query(e.promql)
            data = answer.get("data") or {}
            result = data.get("result")
            if answer.get("status") != "success":
                last[e] = f"{answer.get('errorType')}: {answer.get('error')}"
                if answer.get("errorType") == "bad_data":
                    continue  # a parse error never heals
            elif not result:
                last[e] = "no series"
            elif not _has_value(data):
                last[e] = f"only NaN: {json.dumps(result)[:300]}"
            else:
                last.pop(e, None)
                continue
            still.append(e)
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    return [f"{e.where}\n    {e.expr.strip()}\n    -> {why}" for e, why in last.items()]


def test_promtool_checks_the_alert_rules() -> None:
    promtool = require_binary("promtool")
    if not ALERT_RULES.exists():
        pytest.skip(f"{ALERT_RULES.relative_to(ROOT)} does not exist yet")
    out = subprocess.run(
        [promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_dashboard_expression_returns_series(
    prometheus: PrometheusServer, traffic: None
) -> None:
    expressions = dashboard_expressions()
    failures = evaluate(prometheus, expressions)
    assert not failures, f"{len(failures)} of {len(expressions)} dashboard expressions:\n" + (
        "\n".join(failures)
    )


def test_every_alert_expression_fires(prometheus: PrometheusServer, traffic: None) -> None:
    if not ALERT_RULES.exists():
        pytest.skip(f"{ALERT_RULES.relative_to(ROOT)} does not exist yet")
    expressions = rule_expressions()
    assert expressions, f"no rules in {ALERT_RULES}"
    failures = evaluate(prometheus, expressions)
    assert not failures, f"{len(failures)} of {len(expressions)} rule expressions:\n" + (
        "\n".join(failures)
    )


# What a cluster scrapes (Ray's metrics port, through the ServiceMonitor's renaming) and
# what the replica's /metrics says, by series: one ingress replica here, so they match.
CLUSTER_EQUALS_REPLICA = {
    "chatfleet_tokens_total": ("model", "type"),
    "chatfleet_generations_total": ("model", "finish_reason"),
    "chatfleet_time_to_first_token_seconds_count": ("model",),
    "chatfleet_errors_total": ("code",),
}


def test_the_scraped_series_equal_the_replicas_own(
    serving: Serving, prometheus: PrometheusServer, traffic: None
) -> None:
    """Nothing is lost or doubled on the way through Ray's metrics system.

    (A mirror thread that died once froze every ``ray_chatfleet_*`` series while
    ``/metrics`` kept counting.)
    """
    from prometheus_client.parser import text_string_to_metric_families

    def replica() -> dict[tuple[str, ...], float]:
        text = httpx.get(f"{serving.url}/metrics", timeout=30).text
        return {
            (s.name, *(s.labels[k] for k in CLUSTER_EQUALS_REPLICA[s.name])): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in CLUSTER_EQUALS_REPLICA and s.value
        }

    def scraped() -> dict[tuple[str, ...], float]:
        found: dict[tuple[str, ...], float] = {}
        for name, labels in CLUSTER_EQUALS_REPLICA.items():
            answer = prometheus.query(
                f'sum by ({", ".join(labels)}) ({name}{{job="{SERVING_JOB}"}})'
            )
            for series in answer["data"]["result"]:
                key = (name, *(series["metric"].get(k, "") for k in labels))
                found[key] = float(series["value"][1])
        return found

    deadline = time.monotonic() + EVALUATION_DEADLINE_S
    while (ours := replica()) != (theirs := scraped()) and time.monotonic() < deadline:
        time.sleep(1)
    assert ours, "the replica recorded nothing"
    assert ours == theirs
