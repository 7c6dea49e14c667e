"""The ChatDeployment CRD, generated from the pydantic models.

Pydantic writes JSON Schema (draft 2020-12); a CRD needs a *structural* OpenAPI
v3.0 schema. The translation, in one place:

- ``$ref``/``$defs`` are inlined (a CRD schema can't reference);
- ``anyOf: [X, null]`` (an optional field) becomes ``X``: the API server drops
  nulls of non-nullable fields, and the operator never writes them;
- an ``anyOf`` over several scalar types (``dict[str, str | int | float | bool]``
  values) becomes ``x-kubernetes-preserve-unknown-fields`` (structural schemas
  allow no types inside ``anyOf``); the operator's pydantic validation still
  rejects non-scalars, as ``InvalidSpec``;
- numeric ``exclusiveMinimum``/``exclusiveMaximum`` become OpenAPI 3.0's boolean
  form; ``title``, ``additionalProperties: false`` and ``writeOnly`` go (unknown
  fields are pruned, or rejected by ``kubectl apply``'s strict field validation);
- defaults, including ``default_factory`` ones, are written in pruned form;
- cross-field rules that pydantic checks in validators are restated as CEL
  (``x-kubernetes-validations``) so ``kubectl apply`` rejects them up front.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from chatfleet.operator._models import (
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ChatDeploymentSpec,
    ChatDeploymentStatus,
)
from chatfleet.serving.config import ENGINE_KINDS

CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

# Formats the API server knows; any other is dropped.
_K8S_FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid",
    "uuid3", "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor",
    "rgbcolor", "byte", "password", "date", "duration", "datetime", "int32", "int64",
    "float", "double",
}  # fmt: skip
_DROP = {"title", "additionalProperties:false", "writeOnly", "readOnly", "examples"}


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


_ENGINES_NEEDING_SETTINGS = ("vllm", "ollama", "openai")

# CEL rules per pydantic model (by its $defs name). They restate pydantic's
# cross-field validators; the operator checks the same again (InvalidSpec).
_RULES: dict[str, list[dict[str, str]]] = {
    "ChatDeploymentSpec": [
        _rule(
            "!has(self.serving) || has(self.cluster) && has(self.cluster.gpuWorkers) || !("
            "(has(self.serving.models) && self.serving.models.exists(m,"
            " has(m.num_gpus) && m.num_gpus > 0.0))"
            " || (has(self.serving.classifier) && has(self.serving.classifier.num_gpus)"
            " && self.serving.classifier.num_gpus > 0.0)"
            " || (has(self.serving.compressor) && has(self.serving.compressor.num_gpus)"
            " && self.serving.compressor.num_gpus > 0.0))",
            "models, classifier or compressor asking for GPUs (num_gpus > 0) need"
            " spec.cluster.gpuWorkers",
        ),
    ],
    "AppConfig": [
        _rule(
            "!has(self.default_model) || self.models.exists(m, m.name == self.default_model)",
            "default_model must name a declared model",
            ".default_model",
        ),
        _rule("!has(self.routing) || has(self.classifier)", "routing needs a classifier"),
        _rule(
            "!has(self.store) || !has(self.store.url)",
            "an inline store.url would be stored in plain text: reference a Secret with"
            " spec.cluster.databaseSecretRef",
            ".store.url",
        ),
        _rule(
            "!has(self.routing) || !has(self.routing.routes) || self.routing.routes.all(r,"
            " self.models.exists(m, m.name == r.model))",
            "every route must target a declared model",
            ".routing.routes",
        ),
        _rule(
            "!has(self.routing) || !has(self.routing.routes) || self.routing.routes.all(r,"
            " !has(r.fallbacks) || r.fallbacks.all(f, self.models.exists(m, m.name == f)))",
            "every route fallback must be a declared model",
            ".routing.routes",
        ),
        _rule(
            "!has(self.routing) || !has(self.routing.fallbacks) || self.routing.fallbacks.all(f,"
            " self.models.exists(m, m.name == f))",
            "routing.fallbacks must be declared models",
            ".routing.fallbacks",
        ),
        _rule(
            "!has(self.routing) || !has(self.routing.default_model)"
            " || self.models.exists(m, m.name == self.routing.default_model)",
            "routing.default_model must be a declared model",
            ".routing.default_model",
        ),
        _rule(
            "!has(self.routing) || !has(self.classifier) || !has(self.routing.routes)"
            " || self.routing.routes.all(r,"
            " self.classifier.categories.exists(c, c.name == r.category))",
            "every route must name a category of the classifier",
            ".routing.routes",
        ),
    ],
    "ModelConfig": [
        _rule(
            " && ".join(
                f"(self.engine != '{e}' || has(self.{e}))" for e in _ENGINES_NEEDING_SETTINGS
            ),
            "engines vllm, ollama and openai need their settings block"
            " (e.g. engine: vllm with vllm: {model: ...})",
        ),
        _rule(
            " && ".join(f"(!has(self.{e}) || self.engine == '{e}')" for e in ENGINE_KINDS),
            "only the settings block of the model's own engine may be given",
        ),
        _rule(
            "!has(self.openai) || !has(self.openai.api_key)",
            "an inline openai.api_key would be stored in plain text: set api_key_env and load"
            " the key with spec.cluster.envFromSecrets",
            ".openai.api_key",
        ),
    ],
    "ClientCredential": [
        _rule(
            "has(self.secret_env) != has(self.secret_sha256)",
            "give exactly one of secret_env or secret_sha256",
        ),
    ],
    "GenerationDefaults": [
        # has(): the API server also checks each default against the rules, and the
        # default of `defaults` is {} (its fields are defaulted one level down).
        _rule(
            "!has(self.max_tokens) || !has(self.max_tokens_limit)"
            " || self.max_tokens <= self.max_tokens_limit",
            "max_tokens must not exceed max_tokens_limit",
            ".max_tokens",
        ),
    ],
    "CPUWorkerGroup": [
        _rule(
            "self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas",
            "need minReplicas <= replicas <= maxReplicas",
        ),
    ],
    "GPUWorkerGroup": [
        _rule(
            "self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas",
            "need minReplicas <= replicas <= maxReplicas",
        ),
    ],
    "Toleration": [
        _rule("self.operator != 'Exists' || !has(self.value)", "value must be empty with Exists"),
    ],
}

# Extra bounds so the API server's CEL cost estimate stays small (unbounded
# strings count as megabytes): {$defs name: {property: {keyword: value}}}.
_BOUNDS: dict[str, dict[str, dict[str, Any]]] = {
    "ModelConfig": {"name": {"maxLength": 63}},
    "AppConfig": {
        "default_model": {"maxLength": 63},
        "models": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    },
    "ClassifierConfig": {
        "categories": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    },
    "CategoryConfig": {"name": {"maxLength": 63}},
    "RoutingConfig": {
        "routes": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["category"]},
        "default_model": {"maxLength": 63},
        "fallbacks": {"items": {"maxLength": 63}},
    },
    "RouteConfig": {
        "category": {"maxLength": 63},
        "model": {"maxLength": 63},
        "fallbacks": {"items": {"maxLength": 63}},
    },
    "ClusterSpec": {"envFromSecrets": {"items": {"maxLength": 253}}},
    "HeadGroup": {"nodeSelector": {"maxProperties": 32}},
    "CPUWorkerGroup": {"nodeSelector": {"maxProperties": 32}},
    "GPUWorkerGroup": {"nodeSelector": {"maxProperties": 32}},
}


def _dump_default(value: Any) -> Any:
    # Defaults in the CRD are in pruned form: camelCase where the model aliases,
    # no nulls, and nothing the nested schema defaults anyway.
    if isinstance(value, BaseModel):
        return value.model_dump(
            mode="json", by_alias=True, exclude_defaults=True, exclude_none=True
        )
    if isinstance(value, list):
        return [_dump_default(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump_default(v) for k, v in value.items()}
    return value


class _CRDSchemaGenerator(GenerateJsonSchema):
    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return schema.get("default", NoDefault)

    def encode_default(self, dft: Any) -> Any:
        return super().encode_default(_dump_default(dft))


def _structural(node: Any, defs: dict[str, Any], def_name: str | None = None) -> Any:
    """Translate one pydantic JSON-schema node into a structural CRD schema node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = _structural(defs[name], defs, name)
        # The field's own description and default win over the model's docstring.
        return {**target, **{k: _structural(v, defs) for k, v in node.items()}}
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _structural(node.pop("allOf")[0], defs)
        return {**inner, **_structural(node, defs)}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("default", NoDefault) is None:
            del node["default"]
        if len(options) == 1:
            return {**_structural(options[0], defs), **_structural(node, defs)}
        if all(o.get("type") in ("string", "integer", "number", "boolean") for o in options):
            types = sorted(o["type"] for o in options)
            scalar: dict[str, Any] = _structural(node, defs)
            scalar["x-kubernetes-preserve-unknown-fields"] = True
            kinds = f"{', '.join(types[:-1])} or {types[-1]}"
            scalar["description"] = (scalar.get("description", "") + f" A scalar: {kinds}.").strip()
            return scalar
        raise ValueError(f"cannot express anyOf {options!r} in a structural schema")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "additionalProperties" and value is False):
            continue
        if key == "format" and value not in _K8S_FORMATS:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusive", "").lower()] = value
            out[key] = True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        else:
            out[key] = copy.deepcopy(value)
    if def_name is not None:
        for prop, extra in _BOUNDS.get(def_name, {}).items():
            target = out["properties"][prop]
            for k, v in extra.items():
                if isinstance(v, dict):
                    target[k] = {**target.get(k, {}), **v}
                else:
                    target[k] = v
        if def_name in _RULES:
            out["x-kubernetes-validations"] = copy.deepcopy(_RULES[def_name])
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, schema_generator=_CRDSchemaGenerator)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, model.__name__)  # type: ignore[no-any-return]


def crd_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the ChatDeployment CRD."""
    spec = _model_schema(ChatDeploymentSpec)
    spec["default"] = {}
    status = _model_schema(ChatDeploymentStatus)
    return {
        "type": "object",
        "description": (
            "A chat service: models, routing and access served by Ray Serve on KubeRay,"
            " reconciled by the chatfleet operator."
        ),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            _rule(
                f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters: KubeRay derives"
                " longer names (RayCluster, Services, pod labels) from it",
            )
        ],
    }


def render_crd() -> dict[str, Any]:
    """The whole ChatDeployment CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "chatfleet"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["chatfleet"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Models", "type": "string", "jsonPath": ".status.models"},
                        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": crd_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML text checked in at ``crds/chatfleet.dev_chatdeployments.yaml``."""
    header = (
        "# Generated by `chatfleet-operator crd` from chatfleet.operator's pydantic models.\n"
        "# Do not edit: change the models and regenerate (a test checks for drift).\n"
    )
    return header + yaml.safe_dump(render_crd(), sort_keys=False, width=100)
