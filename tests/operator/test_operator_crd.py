"""The generated CRD: drift, structural-schema rules, defaults, CEL rules, samples."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import jsonschema
import pytest
import yaml
from operator_helpers import BAD_SPECS, FAKE, ROOT, load_sample

from chatfleet.operator import ChatDeploymentSpec, parse_spec, render_crd, render_crd_yaml
from chatfleet.operator.cli import main as cli_main

CRD_PATH = ROOT / "crds" / "chatfleet.dev_chatdeployments.yaml"
SAMPLES = sorted(
    (ROOT / "manifests" / "samples").glob("chatfleet.dev_v1alpha1_chatdeployment*.yaml")
)


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# --- drift and shape ------------------------------------------------------------------------


def test_checked_in_crd_matches_the_models() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), (
        "crds/ is stale: run `chatfleet-operator crd` (python -m chatfleet.operator.cli crd)"
    )


def test_chart_ships_the_same_crd() -> None:
    chart_crd = ROOT / "charts" / "chatfleet" / "files" / "crds" / CRD_PATH.name
    assert chart_crd.read_text() == CRD_PATH.read_text(), "run `chatfleet-operator crd`"


def test_cli_writes_the_crd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crd.yaml"
    assert cli_main(["crd", "--output", str(out)]) == 0
    assert out.read_text() == render_crd_yaml()
    assert cli_main(["crd", "--output", "-"]) == 0
    assert capsys.readouterr().out == render_crd_yaml()
    assert cli_main(["crd", "--check", "--output", str(out)]) == 0
    out.write_text("stale")
    assert cli_main(["crd", "--check", "--output", str(out)]) == 1


def test_names_columns_and_subresources(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "chatdeployments.chatfleet.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["chatd"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Models", "Endpoint", "Age"]
    assert columns["Age"]["type"] == "date"


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    # The API server's rules for structural schemas (apiextensions.k8s.io/v1).
    problems = []
    for path, node in walk(schema_of(crd)):
        for banned in ("$ref", "$defs", "definitions", "title", "const", "allOf", "oneOf"):
            if banned in node:
                problems.append(f"{path}: {banned}")
        if "anyOf" in node and any("type" in o for o in node["anyOf"]):
            problems.append(f"{path}: types inside anyOf")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties")
        if "type" not in node and not (
            node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        ):
            problems.append(f"{path}: no type")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if node.get("nullable") is True and "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
            node.get("exclusiveMinimum"), bool
        ):
            problems.append(f"{path}: numeric exclusiveMinimum (OpenAPI 3.0 wants a boolean)")
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            required = node["items"].get("required", [])
            assert all(k in required or "default" in node["items"]["properties"][k] for k in keys)
    assert not problems, problems


def test_every_field_is_documented(crd: dict[str, Any]) -> None:
    undocumented = [
        path
        for path, node in walk(schema_of(crd)["properties"]["spec"])
        if path and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not undocumented


def test_defaults_are_valid_for_their_own_schema(crd: dict[str, Any]) -> None:
    # The API server rejects a CRD whose defaults do not validate (after pruning).
    for path, node in walk(schema_of(crd)):
        if "default" in node:
            sub = {k: v for k, v in node.items() if k != "default"}
            jsonschema.Draft4Validator(sub).validate(node["default"])
            assert path  # the root has no default
            # ... and so do the CEL rules, on the default as written: the server does not
            # default a default's own fields first (a real API server rejected the CRD
            # for `self.max_tokens` on a `defaults: {}` default).
            try:
                failures = cel_failures(sub, node["default"], path)
            except Exception as exc:  # what the server reports as "no such key" and such
                failures = [f"{path}: {exc}"]
            assert not failures, failures


def test_strings_compared_in_cel_are_bounded(crd: dict[str, Any]) -> None:
    # The API server estimates CEL cost from maxLength/maxItems; unbounded ones blow it.
    nodes = dict(walk(schema_of(crd)))
    models = nodes[".spec.serving.models"]
    assert models["maxItems"] == 64
    assert nodes[".spec.serving.models[].name"]["maxLength"] == 63
    assert nodes[".spec.serving.routing.routes[].model"]["maxLength"] == 63
    for path, node in nodes.items():
        if node.get("x-kubernetes-validations"):
            assert node.get("type") == "object", path


# --- defaulting + validation, as the API server would do it ---------------------------------


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: fill absent properties that have defaults, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not cel.evaluate(rule["rule"], {"self": value}):
            failures.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                failures += cel_failures(sub, value[name], f"{path}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def admit(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What `kubectl apply` would report: schema errors and failed CEL rules."""
    schema = schema_of(crd)
    obj = apply_defaults(schema, obj)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(obj)
    ]
    return errors or cel_failures(schema, obj)


def chatd(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "chatfleet.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": "x"},
        "spec": spec,
    }


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_admitted_and_parse(crd: dict[str, Any], sample: Path) -> None:
    obj = load_sample(sample.name)
    assert admit(crd, obj) == []
    parse_spec(obj["spec"])


def test_there_are_cpu_and_gpu_samples() -> None:
    names = {p.name for p in SAMPLES}
    assert "chatfleet.dev_v1alpha1_chatdeployment.yaml" in names
    assert "chatfleet.dev_v1alpha1_chatdeployment_gpu.yaml" in names


def test_empty_spec_defaults_to_the_embedded_model(crd: dict[str, Any]) -> None:
    assert admit(crd, chatd({})) == []  # the defaults pass the schema and every CEL rule
    obj = apply_defaults(schema_of(crd), chatd({}))
    assert obj["spec"]["serving"]["models"][0]["name"] == "smollm2"
    assert obj["spec"]["cluster"]["head"]["resources"]["limits"]["memory"] == "4Gi"
    # The API server's defaults and pydantic's agree.
    assert parse_spec(obj["spec"]) == ChatDeploymentSpec()


@pytest.mark.parametrize(("spec", "expected"), BAD_SPECS)
def test_bad_specs_are_rejected_by_schema_or_cel(
    crd: dict[str, Any], spec: dict[str, Any], expected: str
) -> None:
    problems = admit(crd, chatd(spec))
    assert any(expected in p for p in problems), problems
    # The operator's own validation agrees (it reports InvalidSpec for what slips through).
    with pytest.raises(Exception, match=r"spec"):
        parse_spec(spec)


def test_duplicate_model_names_are_a_list_map_violation(crd: dict[str, Any]) -> None:
    models = schema_of(crd)["properties"]["spec"]["properties"]["serving"]["properties"]["models"]
    assert models["x-kubernetes-list-type"] == "map"
    assert models["x-kubernetes-list-map-keys"] == ["name"]
    with pytest.raises(Exception, match="duplicate model names"):
        parse_spec({"serving": {"models": [FAKE, FAKE]}})


def test_render_crd_is_deterministic() -> None:
    assert render_crd() == render_crd()
    assert yaml.safe_load(render_crd_yaml()) == render_crd()


def test_names_kuberay_can_extend_are_enforced(crd: dict[str, Any]) -> None:
    ok = chatd({})
    ok["metadata"]["name"] = "c" * 40
    assert admit(crd, ok) == []
    too_long = chatd({})
    too_long["metadata"]["name"] = "c" * 41
    assert any("at most 40 characters" in p for p in admit(crd, too_long))
