"""`chatfleet serve` as a user runs it: a real process, real Ray, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.fakes.ports import free_port

CHATFLEET = [sys.executable, "-m", "chatfleet.serving.cli"]


def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - {name: a, engine: tpu}\n")
    out = subprocess.run(
        [*CHATFLEET, "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "invalid configuration" in out.stderr
    assert "models.0.engine" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_command_prints_help() -> None:
    out = subprocess.run(CHATFLEET, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "serve" in out.stdout


@pytest.mark.ray
def test_serve_streams_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    # The local signing key lands in the data folder: keep it in the test's.
    env = {**os.environ, "RAY_ADDRESS": "", "CHATFLEET_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [*CHATFLEET, "serve", "--engine", "fake", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if "serving on" in Path(log.name).read_text():
                break
            time.sleep(1)
        output = Path(log.name).read_text()
        assert proc.poll() is None, output
        assert f"serving on {url}" in output
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200

        # Auth is on by default: the printed token works, no token is a 401.
        token = re.search(r"token \(expires in \d+ min\): (\S+)", output)
        assert token is not None, output
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token.group(1))
        stream = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert len(text.split()) == 48

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert "chatfleet: stopped." in Path(log.name).read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
