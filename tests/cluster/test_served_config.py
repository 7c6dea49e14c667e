"""The serve config the operator renders, served by a real Ray head the way KubeRay does it.

KubeRay starts ``ray start --head`` in the head Pod with the container's environment and
resources, then ``PUT``s the RayService's ``serveConfigV2`` to the dashboard's
``/api/serve/applications/``, polls until the application is RUNNING and probes Serve's
``/-/healthz``. This test does the same on this machine with the CPU sample's
RayService: the head gets the container's env (HAProxy front and throughput mode
included), ``--num-cpus``/``--memory`` from its limits and the JWT key the Secret would
hold; then a client chats with a token minted from that key (``chatfleet token``, as a
cluster user would) and the config is updated in place.

What differs from a pod, and why: ports are free ones on 127.0.0.1 instead of the
pod's fixed 8000/8265/8404/9101 (other processes here may hold them);
``RAY_AUTH_MODE=disabled`` (Ray 2.60 turns token auth on when ``~/.ray/auth_token``
exists, which a fresh pod never has); the data folder is a temp dir.

One Ray per test session: this module's head is the only Ray of the cluster tier,
which scripts/test runs in a pytest process of its own.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cluster_helpers import ROOT, eventually
from tests.fakes.ports import free_port

from chatfleet.operator import build_rayservice, parse_spec

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from operator_helpers import load_sample

RAY = Path(sys.executable).parent / "ray"
APP = "chatfleet"
KEY = secrets.token_urlsafe(48)

pytestmark = pytest.mark.timeout(1500)


def _quantity_to_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def render(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(serve config as KubeRay PUTs it, head container, head rayStartParams)."""
    rayservice = build_rayservice("chat-cpu", "apps", parse_spec(spec))
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    return config, head["template"]["spec"]["containers"][0], head["rayStartParams"]


@dataclass
class RayHead:
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    dashboard: str
    http_port: int
    log: Path

    def tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        for controller_log in (self.temp_dir / "session_latest" / "logs" / "serve").glob(
            "controller_*.log"
        ):
            text += ["--- " + controller_log.name]
            text += controller_log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)


def _stop(head: RayHead) -> None:
    if head.proc.poll() is None:
        os.killpg(head.proc.pid, signal.SIGTERM)
        try:
            head.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.proc.pid, signal.SIGKILL)
            head.proc.wait()
    # Ray's workers and Serve's HAProxy may outlive their parents (NOTES.md): end
    # every process that still runs out of this head's temp dir, and only those.
    marker = str(head.temp_dir)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    _, container, start_params = render(load_sample(
        "chatfleet.dev_v1alpha1_chatdeployment.yaml")["spec"])  # fmt: skip
    limits = container["resources"]["limits"]
    temp_dir = Path(tempfile.mkdtemp(prefix="cf-ray-", dir="/tmp"))
    data_dir = temp_dir / "data"
    env = {
        **os.environ,
        # The container's own variables (the Secret's key resolved, as the kubelet would).
        **{e["name"]: e["value"] for e in container.get("env") or [] if "value" in e},
        "CHATFLEET_JWT_SIGNING_KEY": KEY,
        "CHATFLEET_DATA_DIR": str(data_dir),
        "RAY_AUTH_MODE": "disabled",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        # HAProxy's files under this head's temp dir, not the machine-wide
        # /tmp/haproxy-serve: so its command line names the temp dir, and a HAProxy
        # that outlives its Ray parents is found and ended with them.
        # (Short names: Serve adds a 56-character folder, HAProxy takes 97 at most.)
        **{
            f"RAY_SERVE_HAPROXY_{name}": str(temp_dir / "h" / leaf)
            for name, leaf in [
                ("CONFIG_FILE_LOC", "h.cfg"),
                ("SOCKET_PATH", "a.sock"),
                ("SERVER_STATE_BASE", ""),
                ("SERVER_STATE_FILE", "state"),
                ("METRICS_SOCKET_PATH", "m.sock"),
            ]
        },
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    assert set(start_params) <= {"dashboard-host"}, f"new rayStartParams: {start_params}"
    dashboard_port = free_port()
    log = temp_dir / "ray-start.log"
    argv = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        # KubeRay derives these from the container's limits.
        f"--num-cpus={int(float(limits['cpu']))}",
        f"--memory={_quantity_to_bytes(limits['memory'])}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(proc, temp_dir, f"http://127.0.0.1:{dashboard_port}", free_port(), log)
    try:

        def dashboard_up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited ({proc.returncode}):\n{head.tail()}")
            try:
                return httpx.get(f"{head.dashboard}/api/serve/applications/").is_success
            except httpx.TransportError:
                return False

        eventually(dashboard_up, "the Ray dashboard's Serve API", timeout=180, every=1)
        yield head
    finally:
        _stop(head)


def deploy(head: RayHead, config: dict[str, Any]) -> float:
    """PUT the config as KubeRay does; wait for RUNNING; the seconds it took."""
    config = copy.deepcopy(config)
    config["http_options"]["port"] = head.http_port
    config["http_options"]["host"] = "127.0.0.1"
    started = time.monotonic()
    response = httpx.put(f"{head.dashboard}/api/serve/applications/", json=config, timeout=60)
    assert response.is_success, response.text

    def running() -> bool:
        details = httpx.get(f"{head.dashboard}/api/serve/applications/", timeout=30).json()
        app = (details.get("applications") or {}).get(APP) or {}
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            pytest.fail(f"{APP}: {app.get('status')}: {app.get('message')}\n{head.tail()}")
        return app.get("status") == "RUNNING" and app.get("last_deployed_time_s", 0) > 0

    eventually(running, f"the {APP} application to be RUNNING", timeout=900, every=2)
    return time.monotonic() - started


def token() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "chatfleet.serving.cli", "token", "--signing-key-file", "-"],
        input=KEY,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_the_rendered_serve_config_deploys_answers_and_updates_in_place(
    ray_head: RayHead,
) -> None:
    sample = load_sample("chatfleet.dev_v1alpha1_chatdeployment.yaml")
    config, container, _ = render(sample["spec"])
    seconds = deploy(ray_head, config)
    print(f"serveConfigV2 deployed: RUNNING after {seconds:.0f} s")
    base = f"http://127.0.0.1:{ray_head.http_port}"

    # KubeRay's probe of a Serve application: it greps for "success".
    assert "success" in httpx.get(f"{base}/-/healthz", timeout=10).text

    headers = {"Authorization": f"Bearer {token()}"}
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    models = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()
    # auto: routing; the classifier's embeddings model is listed too, as not for chat
    assert {m["id"] for m in models["data"] if m["capabilities"]["chat"]} == {
        "smollm2",
        "fake",
        "auto",
    }

    def chat(model: str) -> None:
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            headers=headers,
            json={"model": model, "messages": [{"role": "user", "content": "Hello!"}]},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]

    chat("fake")

    # An edit of spec.serving: the same Ray cluster takes the new config in place.
    edited = copy.deepcopy(sample)
    edited["spec"]["serving"]["models"].append(
        {"name": "fast", "engine": "fake", "fake": {"tokens_per_second": 500}}
    )
    new_config, new_container, _ = render(edited["spec"])
    assert new_container == container  # nothing for KubeRay to restart pods for
    pid_before = ray_head.proc.pid
    seconds = deploy(ray_head, new_config)
    print(f"in-place update: RUNNING after {seconds:.0f} s")
    assert ray_head.proc.poll() is None and ray_head.proc.pid == pid_before

    def updated() -> bool:
        listed = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()
        chat = {m["id"] for m in listed["data"] if m["capabilities"]["chat"]}
        return chat == {"smollm2", "fake", "fast", "auto"}

    eventually(updated, "the new model to be listed", timeout=120)
    chat("fast")
