"""`chatfleet serve` as a user runs it: a real process, real Ray, Ctrl-C.

Start-up mistakes must end in one or two lines naming the cause and the fix, a
non-zero status and no traceback; the mistakes that need no Ray (bad YAML, a
busy port) must be found before Ray starts.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from tests.fakes.serve_process import CHATFLEET, ServeProcess, serve_processes

#: What a quiet start-up never shows (unless --debug).
NOISE = ("Traceback", "alembic", "Token authentication", "legacy behaviour", "ServeController")

#: A context long enough to pass the compressor's 400-token threshold.
REPORT = "\n\n".join(
    f"Section {i}. The quarterly report for the northern region shows that revenue grew by"
    f" {10 + i} percent, mostly because a new product line launched in March and the"
    " sales team doubled its visits to existing customers, while costs stayed flat."
    for i in range(12)
)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHATFLEET, *args], capture_output=True, text=True, timeout=120, env=env)


def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - {name: a, engine: tpu}\n")
    out = _run("serve", "--config", str(path))
    assert out.returncode == 2
    assert "invalid configuration" in out.stderr
    assert "models.0.engine" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  - name: a\n    engine: fake\n   oops: [\n")
    out = _run("serve", "--config", str(path))
    assert out.returncode == 2
    assert f"{path} is not valid YAML at line 4" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2


def test_a_busy_port_is_refused_before_ray_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run("serve", "--engine", "fake", "--port", str(port))
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr, out.stderr
    assert "--port" in out.stderr.splitlines()[1]
    assert "starting Ray" not in out.stdout
    assert "Traceback" not in out.stderr


def test_a_missing_model_folder_is_refused_before_ray_starts(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    missing = tmp_path / "no-such-model"
    path.write_text(
        f"models:\n  - {{name: mine, engine: transformers, transformers: {{model: {missing}}}}}\n"
    )
    out = _run("serve", "--config", str(path))
    assert out.returncode == 1
    assert f"the model folder {missing} does not exist" in out.stderr, out.stderr
    assert "starting Ray" not in out.stdout


def test_no_command_prints_help() -> None:
    out = subprocess.run(CHATFLEET, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "serve" in out.stdout


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    # The embedded default must not need the hub.
    with serve_processes(tmp_path, {"HF_HUB_OFFLINE": "1"}) as start:
        yield start


def _sse_events(body: str) -> list[tuple[str, Any]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            data = fields["data"]
            events.append((fields.get("event", "message"), json.loads(data)))
    return events


@pytest.mark.ray
def test_the_default_pipeline_answers_offline_and_stops_on_ctrl_c(start: Any) -> None:
    server = start("--engine", "fake")
    output = server.wait_for("serving on")
    assert server.proc.poll() is None, output
    url = server.url
    assert f"serving on {url}" in output
    assert '"model": "auto"' in output  # the printed example uses routing
    for noise in NOISE:
        assert noise not in output, output
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    # The Serve replicas and HAProxy carry every token: not at Ray's worker niceness (15).
    serving = {
        p.name(): p.nice()
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if p.name().startswith(("ray::ServeReplica", "haproxy"))
    }
    assert any(n.startswith("haproxy") for n in serving), serving
    assert sum(n.startswith("ray::ServeReplica") for n in serving) >= 3, serving
    assert set(serving.values()) == {0}, serving

    # Auth is on by default: the printed token works, no token is a 401.
    token = re.search(r"token \(expires in \d+ min\): (\S+)", output)
    assert token is not None, output
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {token.group(1)}"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token.group(1))
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(text.split()) == 48

    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        verdict = http.post("/api/classify", json={"prompt": "What is 17 times 23?"})
        assert verdict.status_code == 200, verdict.text
        assert verdict.json()["category"] == "maths"

        # model "auto": maths goes to the simulator that thinks first.
        routed = http.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "Solve 3x + 4 = 19"}]},
        )
        assert routed.status_code == 200, routed.text
        assert routed.json()["model"] == "fake-reasoner"

        small_talk = http.post(
            "/api/models/select", json={"prompt": "Hello there, how was your weekend?"}
        )
        assert small_talk.status_code == 200, small_talk.text
        events = _sse_events(small_talk.text)
        assert events[0][0] == "metadata"
        assert events[0][1]["category"] == "chit-chat"
        assert events[0][1]["selected_model"] == "fake"
        assert events[-1][0] == "end_stream"

        compressed = http.post("/api/compress", json={"text": REPORT, "ratio": 0.5})
        assert compressed.status_code == 200, compressed.text
        result = compressed.json()
        assert not result["skipped"]
        assert result["compressed_tokens"] < 0.8 * result["original_tokens"]

    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=90) == 0
    assert "chatfleet: stopped." in server.output


@pytest.mark.ray
def test_a_replica_that_cannot_load_its_model_is_reported_from_serve(
    start: Any, tmp_path: Path
) -> None:
    # A folder that passes the checks before Ray (it has a config.json) but that
    # transformers cannot load: only the replica finds out.
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "app.yaml"
    config.write_text(
        f"models:\n  - {{name: broken, engine: transformers, transformers: {{model: {model}}}}}\n"
    )
    server = start("--config", str(config))
    assert server.proc.wait(timeout=300) == 1
    output = server.output
    assert "model 'broken' failed to start: EngineUnavailable:" in output, output
    assert "--debug shows the traceback" in output
    assert "Traceback" not in output
