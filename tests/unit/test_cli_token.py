"""``chatfleet token``: a cluster user's way to a token, from the deployment's signing key."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.cli import main
from chatfleet.serving.config import AuthConfig

KEY = "k" * 48


def verifier(key: str = KEY) -> Authenticator:
    return Authenticator(AuthConfig(), key, MemoryRevocationStore(), environ={})


async def test_a_token_from_the_key_on_stdin_is_accepted_by_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As README's one-liner pipes it: kubectl get secret ... | base64 -d | chatfleet token ...
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY + "\n"))
    assert main(["token", "--signing-key-file", "-", "--client-id", "ops"]) == 0
    token = capsys.readouterr().out.strip()
    claims = await verifier().validate(token)
    assert claims.client_id == "ops"
    with pytest.raises(Exception, match="invalid token"):
        verifier("x" * 48).decode(token)


def test_refresh_pair_and_key_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    assert main(["token", "--signing-key-file", str(key_file), "--refresh"]) == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["token_type"] == "bearer"
    assert verifier().decode(pair["refresh_token"]).token_type == "refresh"


def test_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATFLEET_JWT_SIGNING_KEY", KEY)
    assert main(["token"]) == 0
    assert verifier().decode(capsys.readouterr().out.strip()).client_id == "admin"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--signing-key-file", "/nonexistent/key"], "No such file"),
        (["--signing-key-file", "-"], "shorter than 32 bytes"),
    ],
)
def test_bad_keys_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("short"))
    assert main(["token", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and "Traceback" not in captured.err
