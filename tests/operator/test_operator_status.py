"""Status mirroring and spec errors: pure functions, no server."""

from __future__ import annotations

from typing import Any

import pytest

from chatfleet.operator import ChatDeploymentStatus, InvalidSpecError, OperatorSettings, parse_spec
from chatfleet.operator._status import (
    conditions_from_rayservice,
    invalid_spec_conditions,
    stamp_transitions,
)


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def rayservice(status: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": status}


def test_missing_rayservice_is_progressing() -> None:
    conds = by_type(conditions_from_rayservice(None, 1))
    assert conds["Ready"]["status"] == "False"
    assert conds["Progressing"]["status"] == "True"
    assert conds["InvalidSpec"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conds.values())


def test_ready_from_the_ready_condition() -> None:
    rs = rayservice(
        {
            "observedGeneration": 3,
            "conditions": [{"type": "Ready", "status": "True", "reason": "RayServiceReady"}],
            "activeServiceStatus": {"applicationStatuses": {"chatfleet": {"status": "RUNNING"}}},
        }
    )
    conds = by_type(conditions_from_rayservice(rs, 2))
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("True", "RayServiceReady")
    assert conds["Progressing"]["status"] == "False"
    assert conds["Degraded"]["status"] == "False"


def test_ready_from_the_older_service_status() -> None:
    rs = rayservice({"observedGeneration": 3, "serviceStatus": "Running"})
    assert by_type(conditions_from_rayservice(rs, 1))["Ready"]["status"] == "True"


def test_stale_and_upgrading_are_progressing() -> None:
    ready = [{"type": "Ready", "status": "True", "reason": "RayServiceReady"}]
    stale = rayservice({"observedGeneration": 2, "conditions": ready})
    conds = by_type(conditions_from_rayservice(stale, 1))
    assert conds["Progressing"]["status"] == "True"
    assert conds["Progressing"]["reason"] == "Reconciling"
    upgrading = rayservice(
        {
            "observedGeneration": 3,
            "conditions": [*ready, {"type": "UpgradeInProgress", "status": "True"}],
        }
    )
    assert by_type(conditions_from_rayservice(upgrading, 1))["Progressing"]["reason"] == "Upgrading"


@pytest.mark.parametrize("state", ["DEPLOY_FAILED", "UNHEALTHY"])
def test_failed_application_is_degraded_not_progressing(state: str) -> None:
    rs = rayservice(
        {
            "observedGeneration": 3,
            "conditions": [{"type": "Ready", "status": "False", "reason": "Unhealthy"}],
            "activeServiceStatus": {
                "applicationStatuses": {"chatfleet": {"status": state, "message": "boom"}}
            },
        }
    )
    conds = by_type(conditions_from_rayservice(rs, 1))
    assert conds["Degraded"]["status"] == "True"
    assert "boom" in conds["Degraded"]["message"]
    assert conds["Progressing"]["status"] == "False"


def test_transition_times_are_kept_while_status_holds() -> None:
    first = stamp_transitions(conditions_from_rayservice(None, 1), None, "t1")
    assert {c["lastTransitionTime"] for c in first} == {"t1"}
    ready = rayservice({"observedGeneration": 3, "serviceStatus": "Running"})
    second = by_type(stamp_transitions(conditions_from_rayservice(ready, 1), first, "t2"))
    assert second["Ready"]["lastTransitionTime"] == "t2"  # False -> True
    assert second["InvalidSpec"]["lastTransitionTime"] == "t1"  # still False


def test_conditions_fit_the_status_model() -> None:
    conds = stamp_transitions(
        invalid_spec_conditions("spec.x: bad", 4), None, "2026-01-01T00:00:00Z"
    )
    status = ChatDeploymentStatus.model_validate({"observedGeneration": 4, "conditions": conds})
    assert by_type(conds)["InvalidSpec"]["status"] == "True"
    assert status.conditions[0].type == "Ready"


def test_invalid_spec_messages_name_the_fields() -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(
            {
                "serving": {"models": [{"name": "m", "engine": "ollama"}]},
                "cluster": {"gpuWorkers": {"gpusPerPod": -1}, "bogus": 1},
            }
        )
    message = str(info.value)
    assert "spec.serving.models[0]" in message
    assert "spec.cluster.gpuWorkers.gpusPerPod" in message
    assert "spec.cluster.bogus" in message


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLEET_OPERATOR_NAMESPACES", '["a", "b"]')
    monkeypatch.setenv("CHATFLEET_OPERATOR_METRICS_PORT", "9100")
    monkeypatch.setenv("CHATFLEET_OPERATOR_FORBIDDEN_RETRY_S", "15")
    settings = OperatorSettings()
    assert settings.namespaces == ["a", "b"]
    assert settings.metrics_port == 9100
    assert settings.forbidden_retry_s == 15
    monkeypatch.setenv("CHATFLEET_OPERATOR_FORBIDDEN_RETRY_S", "0")
    with pytest.raises(ValueError, match="forbidden_retry_s"):
        OperatorSettings()


def test_run_command_maps_settings_to_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    from chatfleet.operator.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **kwargs: None)
    # No cluster here: the API server check is tested in tests/unit/test_cli_operator.py.
    monkeypatch.setattr("chatfleet.operator.cli.check_cluster", lambda kubeconfig: None)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod: every interface
    monkeypatch.delenv("CHATFLEET_OPERATOR_PEERING", raising=False)
    assert main(["run", "--liveness", ""]) == 0
    monkeypatch.setenv("CHATFLEET_OPERATOR_PEERING", "chatfleet")
    monkeypatch.setenv("CHATFLEET_OPERATOR_NAMESPACES", '["team-a"]')
    assert main(["run"]) == 0
    alone, peered = calls
    assert alone["standalone"] is True and alone["clusterwide"] is True
    assert alone["liveness_endpoint"] is None and alone["priority"] is None
    assert peered["standalone"] is False and peered["peering_name"] == "chatfleet"
    assert peered["namespaces"] == ["team-a"] and peered["clusterwide"] is False
    assert peered["priority"] > 0  # random per replica: equal priorities pause all
    assert peered["liveness_endpoint"] == "http://0.0.0.0:8081/healthz"
