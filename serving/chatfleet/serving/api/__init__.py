"""The ingress HTTP API (OpenAI-compatible and chatfleet-native), built from plain objects."""

from chatfleet.serving.api._app import create_app
from chatfleet.serving.api._clients import (
    ClassifierClient,
    CompressorClient,
    EmbeddingsClient,
    EngineClient,
    LocalEmbeddingsClient,
    LocalEngineClient,
    LocalRouterClient,
    ModelLoading,
    RouterClient,
)
from chatfleet.serving.api._metrics import Metrics

__all__ = [
    "ClassifierClient",
    "CompressorClient",
    "EmbeddingsClient",
    "EngineClient",
    "LocalEmbeddingsClient",
    "LocalEngineClient",
    "LocalRouterClient",
    "Metrics",
    "ModelLoading",
    "RouterClient",
    "create_app",
]
