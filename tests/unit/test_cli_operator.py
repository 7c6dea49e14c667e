"""``chatfleet-operator``'s start-up messages: one line and a non-zero exit, no traceback."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fakes.ports import free_port

from chatfleet.operator import OperatorSettings
from chatfleet.operator.cli import bind_defaults, main

# A process where only the serving extra is installed: kopf and the Kubernetes client
# cannot be imported (a None entry in sys.modules makes ``import`` fail).
WITHOUT_OPERATOR_EXTRA = (
    "import sys\n"
    "sys.modules['kopf'] = None\n"
    "sys.modules['kubernetes'] = None\n"
    "sys.modules['kubernetes_asyncio'] = None\n"
    "from chatfleet.operator.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _without_extra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_OPERATOR_EXTRA, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_and_crd_work_without_the_operator_extra() -> None:
    help_ = _without_extra("--help")
    assert help_.returncode == 0, help_.stderr
    assert "run" in help_.stdout and "crd" in help_.stdout
    crd = _without_extra("crd", "--output", "-")
    assert crd.returncode == 0, crd.stderr
    assert "kind: CustomResourceDefinition" in crd.stdout


def test_run_without_the_operator_extra_names_it() -> None:
    out = _without_extra("run")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "chatfleet-operator: the operator needs kopf, part of the operator extra:"
        " pip install 'chatfleet[operator]'"
    )


def test_the_kopf_side_of_the_package_names_the_extra_too() -> None:
    code = (
        "import sys\nsys.modules['kopf'] = None\nimport chatfleet.operator as o\n"
        "try:\n    o.build_registry\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'chatfleet[operator]'" in out.stdout


@pytest.fixture
def outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)


@pytest.mark.usefixtures("outside_a_pod")
def test_run_with_no_cluster_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATFLEET_OPERATOR_KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chatfleet-operator: no Kubernetes cluster configured"), err
    assert "KUBECONFIG" in err.splitlines()[1]
    assert "Traceback" not in err


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.mark.usefixtures("outside_a_pod")
def test_run_with_an_unreachable_api_server_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", server)
    monkeypatch.setenv("CHATFLEET_OPERATOR_KUBECONFIG", str(kubeconfig))
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"chatfleet-operator: cannot reach the Kubernetes API server at {server}")
    assert len(err.strip().splitlines()) == 2
    assert "Traceback" not in err


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"kind":"Status","status":"Failure","code":401,"reason":"Unauthorized"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_api_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.usefixtures("outside_a_pod")
def test_run_with_refused_credentials_says_so(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    refusing_api_server: str,
) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", refusing_api_server)
    monkeypatch.setenv("CHATFLEET_OPERATOR_KUBECONFIG", str(kubeconfig))
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "refused the credentials (401)" in err, err


def test_outside_a_pod_the_endpoints_listen_on_loopback() -> None:
    settings, liveness = bind_defaults(OperatorSettings(), None, {})
    assert settings.metrics_host == "127.0.0.1"
    assert liveness == "http://127.0.0.1:8081/healthz"


def test_in_a_pod_the_endpoints_listen_on_every_interface() -> None:
    settings, liveness = bind_defaults(
        OperatorSettings(), None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    )
    assert settings.metrics_host == "0.0.0.0"
    assert liveness == "http://0.0.0.0:8081/healthz"


def test_addresses_given_explicitly_are_kept() -> None:
    chosen = OperatorSettings(metrics_host="192.0.2.1")
    settings, liveness = bind_defaults(
        chosen, "http://10.1.1.1:9000/healthz", {"CHATFLEET_OPERATOR_METRICS_HOST": "192.0.2.1"}
    )
    assert settings.metrics_host == "192.0.2.1"
    assert liveness == "http://10.1.1.1:9000/healthz"
    assert bind_defaults(OperatorSettings(), "", {})[1] == ""  # empty disables liveness
