"""AppConfig: validation, files, environment, and the no-heavy-imports rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import chatfleet.serving.config as config_pkg
from chatfleet.serving.config import AppConfig, ModelConfig, load_config


def test_public_surface() -> None:
    assert sorted(config_pkg.__all__) == [
        "AdmissionConfig",
        "AffinityConfig",
        "AppConfig",
        "AuthConfig",
        "AutoscalingConfig",
        "CategoryConfig",
        "ClassifierConfig",
        "ClientBudget",
        "ClientCredential",
        "CoalesceConfig",
        "CompressorConfig",
        "CredentialGuessingConfig",
        "ENGINE_KINDS",
        "ENV_PREFIX",
        "EngineCapabilities",
        "EngineKind",
        "FakeEngineConfig",
        "FakeToolCallsConfig",
        "GenerationDefaults",
        "IngressDeploymentConfig",
        "ModelConfig",
        "OllamaEngineConfig",
        "OpenAIEngineConfig",
        "RateLimitConfig",
        "RouteConfig",
        "RoutingConfig",
        "ServerConfig",
        "StoreConfig",
        "TelemetryConfig",
        "TransformersEngineConfig",
        "VLLMEngineConfig",
        "WebSocketConfig",
        "load_config",
    ]
    assert all(hasattr(config_pkg, name) for name in config_pkg.__all__)


def test_default_is_the_embedded_cpu_model() -> None:
    config = AppConfig()
    assert [(m.name, m.engine) for m in config.models] == [("smollm2", "transformers")]
    assert config.models[0].transformers is not None
    assert config.models[0].transformers.model is None
    assert config.default_model_name == "smollm2"
    assert 0 < config.models[0].num_cpus < 1


def test_engine_block_must_match_engine() -> None:
    with pytest.raises(ValidationError, match="engine 'ollama' needs its settings"):
        ModelConfig(name="m", engine="ollama")
    with pytest.raises(ValidationError, match="settings for fake given"):
        ModelConfig(
            name="m", engine="openai", openai={"base_url": "http://x", "model": "y"}, fake={}
        )


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        ([{"name": "a", "engine": "fake"}] * 2, {}, "duplicate model names: a"),
        ([{"name": "a", "engine": "fake"}], {"default_model": "b"}, "'b' is not a declared"),
        ([{"name": "Bad Name", "engine": "fake"}], {}, "should match pattern"),
        ([{"name": "a", "engine": "tpu"}], {}, "Input should be 'fake'"),
        ([{"name": "a", "engine": "fake", "num_gpus": -1}], {}, "greater than or equal to 0"),
        ([], {}, "at least 1 item"),
    ],
)
def test_invalid_configs_name_the_problem(
    models: list[dict[str, object]], extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"models": models, **extra})


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppConfig.model_validate({"servr": {}})


def test_load_yaml_file_then_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(
        "models:\n"
        "  - name: fast\n    engine: fake\n    fake: {reply_tokens: 5}\n"
        "  - name: remote\n    engine: openai\n"
        "    openai: {base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: KEY}\n"
        "server: {port: 9000}\n"
    )
    config = load_config(path, environ=False)
    assert [m.name for m in config.models] == ["fast", "remote"]
    assert config.server.port == 9000
    monkeypatch.setenv("CHATFLEET_SERVER__PORT", "9100")
    monkeypatch.setenv("CHATFLEET_DEFAULT_MODEL", "remote")
    config = load_config(path)
    assert config.server.port == 9100
    assert config.default_model_name == "remote"


def test_load_json_file_and_env_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.json"
    path.write_text(json.dumps({"models": [{"name": "f", "engine": "fake"}]}))
    monkeypatch.setenv("CHATFLEET_SERVER__CORS_ALLOW_ORIGINS", '["http://localhost:3000"]')
    config = load_config(path)
    assert config.server.cors_allow_origins == ["http://localhost:3000"]


def test_bad_env_value_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLEET_SERVER__PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        load_config()


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_json() -> None:
    config = AppConfig.for_engine("fake", server={"port": 8080})
    again = AppConfig.model_validate_json(config.model_dump_json())
    assert again == config


def test_importing_config_pulls_no_heavy_dependencies() -> None:
    code = (
        "import sys, chatfleet.serving.config\n"
        "heavy = {'ray', 'torch', 'transformers', 'fastapi', 'httpx'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inline_api_key_survives_json_but_not_repr() -> None:
    model = ModelConfig(
        name="r",
        engine="openai",
        openai={"base_url": "http://x/v1", "model": "m", "api_key": "sk-1"},
    )
    config = AppConfig(models=[model])
    assert "sk-1" not in repr(config)
    again = AppConfig.model_validate_json(config.model_dump_json())
    assert again.models[0].openai is not None
    assert again.models[0].openai.api_key is not None
    assert again.models[0].openai.api_key.get_secret_value() == "sk-1"
