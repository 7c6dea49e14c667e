"""Refuse what a model's engine cannot honour, rather than drop it without a word.

Each engine declares what it can do (`ModelConfig.capabilities`, next to the engine
configs); a request says what it asks for (`SamplingFields.asks`, `sampling_extras`).
`checked_sampling` holds one against the other for the model that will answer, so a
request routed by ``auto`` is checked against the model the router chose.
"""

from __future__ import annotations

from typing import Any

from chatfleet.serving.api._schemas import SamplingFields
from chatfleet.serving.config import EngineCapabilities, ModelConfig
from chatfleet.serving.errors import RequestError

__all__ = ["checked_sampling", "model_capabilities"]


def checked_sampling(model: ModelConfig, sampling: SamplingFields) -> dict[str, int | float]:
    """The request's sampling extras for ``model``; `RequestError` for anything it lacks."""
    capabilities = model.capabilities()
    for ask in sampling.asks():
        if not capabilities.supports(ask.capability):
            why = capabilities.reason_lacking(ask.capability)
            raise _unsupported(model, ask.what + (f": {why}" if why else ""), ask.param)
    extras = sampling.sampling_extras()
    for name in extras:
        if name not in capabilities.sampling:
            raise _unsupported(model, name, name)
    return extras


def model_capabilities(models: list[ModelConfig]) -> dict[str, Any]:
    """What every one of ``models`` supports, as ``GET /v1/models`` shows it."""
    shared = EngineCapabilities.shared([m.capabilities() for m in models]).as_dict()
    return {"chat": True, "embeddings": False, **shared}


def _unsupported(model: ModelConfig, what: str, param: str) -> RequestError:
    return RequestError(
        f"model {model.name} (engine {model.engine}) does not support {what}", param=param
    )
