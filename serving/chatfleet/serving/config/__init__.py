"""The one schema of a chatfleet serving application.

`AppConfig` is what ``chatfleet serve --config`` reads, what Ray Serve's
``build_app`` receives as its args, and what a ChatDeployment's ``spec.serving``
holds (the operator generates the CRD schema from these models, so every
``Field(description=...)`` here is user-facing documentation).

This package is pure pydantic: importing it must not import Ray, torch or any web
framework (an import-linter contract holds that).

One module per concern: ``_engines`` (the models served and their engines),
``_server`` (the ingress: HTTP, WebSockets, token batching), ``_scaling`` (a
model's admission and autoscaling), ``_routing``
(classifier, compressor, routes), ``_store``, ``_auth``, ``_telemetry``, and
``_app`` (`AppConfig` itself and `load_config`).
"""

from chatfleet.serving.config._app import ENV_PREFIX, AppConfig, load_config
from chatfleet.serving.config._auth import (
    AuthConfig,
    ClientBudget,
    ClientCredential,
    CredentialGuessingConfig,
    RateLimitConfig,
)
from chatfleet.serving.config._capabilities import ENGINE_KINDS, EngineCapabilities, EngineKind
from chatfleet.serving.config._engines import (
    FakeEngineConfig,
    FakeToolCallsConfig,
    GenerationDefaults,
    ModelConfig,
    OllamaEngineConfig,
    OpenAIEngineConfig,
    TransformersEngineConfig,
    VLLMEngineConfig,
)
from chatfleet.serving.config._routing import (
    CategoryConfig,
    ClassifierConfig,
    CompressorConfig,
    RouteConfig,
    RoutingConfig,
)
from chatfleet.serving.config._scaling import AdmissionConfig, AffinityConfig, AutoscalingConfig
from chatfleet.serving.config._server import (
    CoalesceConfig,
    IngressDeploymentConfig,
    ServerConfig,
    WebSocketConfig,
)
from chatfleet.serving.config._store import StoreConfig
from chatfleet.serving.config._telemetry import TelemetryConfig

__all__ = [
    "ENGINE_KINDS",
    "ENV_PREFIX",
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
