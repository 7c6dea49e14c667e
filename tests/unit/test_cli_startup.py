"""``chatfleet serve`` before and around Ray: the embedded default, the checks, the messages."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chatfleet.serving import cli
from chatfleet.serving._preflight import StartupError, check_models, check_port
from chatfleet.serving._startup import describe_parts, replica_error
from chatfleet.serving.config import AppConfig, CompressorConfig, ModelConfig

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _serve_config(*argv: str) -> AppConfig:
    return cli._serve_config(cli._parser().parse_args(["serve", *argv]))


# ---- the embedded default --------------------------------------------------------


def test_with_no_config_file_the_default_is_the_whole_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CHATFLEET_MODELS", raising=False)
    config = _serve_config()
    assert [m.name for m in config.models] == ["smollm2"]
    assert config.classifier is not None and config.classifier.backend == "embedding"
    assert config.classifier.model is None  # the embedded MiniLM
    assert config.compressor == CompressorConfig(method="llmlingua")  # SmolLM2, no hub
    assert config.routing is not None
    routed = {r.category: r.model for r in config.routing.routes}
    assert routed == {c.name: "smollm2" for c in config.classifier.categories}


def test_the_fake_profile_routes_reasoning_to_its_thinking_simulator() -> None:
    config = _serve_config("--engine", "fake")
    assert [m.name for m in config.models] == ["fake", "fake-reasoner"]
    assert config.default_model_name == "fake"
    reasoner = config.model("fake-reasoner")
    assert reasoner is not None and reasoner.fake is not None
    assert reasoner.fake.thinking_tokens > 0
    assert config.routing is not None and config.compressor is not None
    routes = {r.category: (r.model, r.fallbacks) for r in config.routing.routes}
    assert routes["coding"] == routes["maths"] == ("fake-reasoner", ["fake"])
    assert routes["chit-chat"] == ("fake", [])


def test_a_config_file_keeps_its_own_choices(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("models:\n  - {name: mine, engine: fake}\n")
    config = _serve_config("--config", str(path))
    assert [m.name for m in config.models] == ["mine"]
    assert config.classifier is None and config.routing is None and config.compressor is None


def test_engine_replaces_a_files_models_and_routes_together(tmp_path: Path) -> None:
    # Routes naming the file's models would not resolve over the profile's models.
    path = tmp_path / "app.yaml"
    path.write_text(
        "models: [{name: mine, engine: fake}]\n"
        "classifier: {}\n"
        "routing: {routes: [{category: coding, model: mine}]}\n"
        "server: {port: 9123}\n"
    )
    config = _serve_config("--config", str(path), "--engine", "fake")
    assert config.routing is not None
    assert {r.model for r in config.routing.routes} == {"fake", "fake-reasoner"}
    assert config.server.port == 9123  # everything else still comes from the file


def test_the_bare_default_is_recognised() -> None:
    assert AppConfig().is_bare_default()
    assert not AppConfig.for_engine("fake").is_bare_default()
    assert not AppConfig().with_embedded_pipeline("transformers").is_bare_default()


def test_the_embedded_default_needs_nothing_from_the_hub() -> None:
    check_models(AppConfig().with_embedded_pipeline("transformers"), OFFLINE)
    check_models(AppConfig().with_embedded_pipeline("fake"), OFFLINE)


def test_the_stage_line_names_every_part() -> None:
    parts = describe_parts(AppConfig().with_embedded_pipeline("transformers"))
    assert parts == (
        "smollm2 (transformers), the classifier, the compressor (llmlingua), the router"
    )


# ---- models that cannot be had -----------------------------------------------------


def _one_model(reference: str) -> AppConfig:
    model = ModelConfig.model_validate(
        {"name": "mine", "engine": "transformers", "transformers": {"model": reference}}
    )
    return AppConfig(models=[model])


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"the model folder .* does not exist") as caught:
        check_models(_one_model(str(tmp_path / "gone")), OFFLINE)
    assert "models[0] (mine) transformers.model" in caught.value.cause
    assert "config.json" in caught.value.fix


def test_a_folder_that_is_not_a_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"has no config\.json"):
        check_models(_one_model(str(tmp_path)), OFFLINE)
    (tmp_path / "config.json").write_text("{}")
    check_models(_one_model(str(tmp_path)), OFFLINE)


def test_a_hub_id_offline_and_not_cached_is_named() -> None:
    with pytest.raises(StartupError, match="HF_HUB_OFFLINE is set") as caught:
        check_models(_one_model("chatfleet-tests/never-downloaded"), OFFLINE)
    assert "huggingface-cli download chatfleet-tests/never-downloaded" in caught.value.fix


def test_the_hub_compressor_offline_points_at_the_embedded_one() -> None:
    config = AppConfig.for_engine("fake", compressor=CompressorConfig())  # llmlingua2
    with pytest.raises(StartupError, match="llmlingua-2-xlm-roberta-large") as caught:
        check_models(config, OFFLINE)
    assert "compressor.method: llmlingua" in caught.value.fix


def test_an_llmlingua2_folder_must_be_named_after_its_base_model(tmp_path: Path) -> None:
    config = AppConfig.for_engine("fake", compressor={"model": str(tmp_path)})
    with pytest.raises(StartupError, match="xlm-roberta-large or bert-base-multilingual-cased"):
        check_models(config, OFFLINE)


def test_serve_reports_a_model_it_cannot_have_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(
        f"models: [{{name: m, engine: transformers, transformers: {{model: {tmp_path / 'x'}}}}}]\n"
    )
    assert cli.main(["serve", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err
    assert "starting Ray" not in captured.out


# ---- ports ---------------------------------------------------------------------------


def test_a_port_in_use_is_named_with_the_flag_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"port {port} on 127.0.0.1 is already in use") as e:
            check_port("127.0.0.1", port, flag="--metrics-port")
    assert "--metrics-port" in e.value.fix
    check_port("127.0.0.1", port)  # free again


def test_an_address_of_another_machine_is_named() -> None:
    with pytest.raises(StartupError, match="not an address of this machine"):
        check_port("192.0.2.1", 8000)  # TEST-NET-1: never local


def test_invalid_yaml_is_two_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("server:\n  port: [8000\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"chatfleet: {path} is not valid YAML at line 3"), err
    assert "without --config" in err[1]


# ---- a replica's failure, from Serve's status ----------------------------------------

SERVE_MESSAGE = (
    "The deployment failed to start 1 times in a row. This may be due to a problem with"
    " its constructor or initial health check failing. See controller logs for details."
    " Error:\n"
    "\x1b[36mray::ServeReplica:chatfleet:engine-mine.initialize_and_get_metadata()\x1b[39m"
    " (pid=1, ip=127.0.0.1)\n"
    '  File "/x/_engine.py", line 40, in __init__\n'
    "    raise EngineUnavailable(...)\n"
    "chatfleet.serving.errors.EngineUnavailable: model 'mine' could not load /m: bad\n"
)


def test_the_replicas_exception_is_its_last_line() -> None:
    assert replica_error(SERVE_MESSAGE) == "EngineUnavailable: model 'mine' could not load /m: bad"
    assert replica_error("just a sentence") == "just a sentence"
    assert 'File "/x/_engine.py"' in replica_error(SERVE_MESSAGE, debug=True)


def test_a_failing_deployment_is_reported_at_its_first_failure() -> None:
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatusOverview,
    )

    from chatfleet.serving._startup import _failure

    def deployment(status: DeploymentStatus, message: str) -> DeploymentStatusOverview:
        trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
        return DeploymentStatusOverview(status, trigger, {}, message)

    def application(**deployments: DeploymentStatusOverview) -> ApplicationStatusOverview:
        return ApplicationStatusOverview(ApplicationStatus.DEPLOYING, "", 0.0, deployments)

    loading = application(ingress=deployment(DeploymentStatus.UPDATING, ""))
    assert _failure(loading, debug=False) is None
    failing = application(
        ingress=deployment(DeploymentStatus.UPDATING, ""),
        **{"engine-mine": deployment(DeploymentStatus.UPDATING, SERVE_MESSAGE)},
    )
    error = _failure(failing, debug=False)
    assert error is not None
    assert error.cause == (
        "model 'mine' failed to start: EngineUnavailable: model 'mine' could not load /m: bad"
    )
    assert "--debug" in error.fix
