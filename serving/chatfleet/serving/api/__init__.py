"""The ingress HTTP API (OpenAI-compatible and chatfleet-native), built from plain objects."""

from chatfleet.serving.api._app import EngineClient, LocalEngineClient, create_app
from chatfleet.serving.api._metrics import Metrics

__all__ = ["EngineClient", "LocalEngineClient", "Metrics", "create_app"]
